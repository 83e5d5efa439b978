"""opensora_duca: training-free DuCa dual feature caching for Open-Sora-style video DiTs."""
__version__ = "0.1.0"
