"""Training recipes (accelerate): VQ tokenizer and AR generators; `vargen train tokenizer|ar --config FILE`."""
