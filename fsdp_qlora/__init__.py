"""fsdp_qlora: QLoRA/QDoRA fine-tuning on FSDP2."""

__version__ = "0.1.0"
