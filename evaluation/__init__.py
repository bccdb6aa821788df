"""Image metrics of the papers (CLIP score, FID/KID, patch-FID/KID), from local weights only."""
