"""Single-device gpt-oss: config, exact layer math, MXFP4, checkpoints, tokenizer, generation."""
