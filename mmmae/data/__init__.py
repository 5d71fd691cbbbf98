"""Data pipeline pieces shared by every modality: transforms, collate (masks are made here), samplers."""
