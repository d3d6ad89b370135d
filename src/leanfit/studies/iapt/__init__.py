"""The IAPT studies: ``leanfit run iapt`` (IAPT against PEFT LoRA, prefix and prompt tuning at matched budgets) and
``leanfit bench iapt-serving``."""
