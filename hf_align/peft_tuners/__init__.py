"""PEFT tuners registered with ``peft`` on import."""
