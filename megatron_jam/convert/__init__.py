"""Checkpoint conversion: parents in, JAM models out, as pure functions on `dict[str, Tensor]`.

Modules: `common` (errors, Megatron's grouped QKV layout, the canonical key
names), one module per source family (`hf_llama`, `hf_opt`, `hf_emu3`, over the
shared rename engine in `hf_family`), readers that stream a parent part by part
(`readers`), a parent's VQ image tokenizer kept beside the model (`vq`), the
vocabulary plan (`vocab`), one module per fusion method
(`uniform`, `width`, `cross`), the checkpoint writer/loader (`checkpoint`),
the driver used by tools/convert_checkpoint.py (`pipeline`) and `export`
back to Hugging Face format. See docs/convert.md.
"""
