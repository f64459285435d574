"""Other libraries' models through the ops and modules: fastlora.patch (PEFT, loralib), PEFT checkpoints, the
PEFT multi-adapter wrapper, PEFT's LoRA on MoE experts.
"""
