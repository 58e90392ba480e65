"""Sample-quality metrics: Inception features (`inception`), DINOv2 features for FD-DINOv2
(`dinov2`), FID / IS / KID and feature statistics (`stats`), the Frechet distance of the
digits classifier (`digits`)."""
