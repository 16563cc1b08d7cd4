"""The medattn HTTP service (BentoML); the entry point is ``serving.service:MedattnService``."""
