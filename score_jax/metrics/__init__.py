"""Sample-quality metrics: Inception features (`inception`), FID / IS / KID and feature
statistics (`stats`), the Frechet distance of the digits classifier (`digits`)."""
