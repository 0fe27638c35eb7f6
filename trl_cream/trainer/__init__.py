"""The TRL trainer: configuration, round phases, resume, validation, datasets and the SFT stage."""
