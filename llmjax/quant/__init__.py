"""Weight-only quantization: int8 / int4 / int3 / NF4 formats, GPTQ, and a quantized model forward."""
