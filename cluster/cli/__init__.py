"""The `gptoss-ray` command (`main`) and its batch and harmony subcommands."""
