"""The nn.Modules over the ops: LoraLinear / MergedLoraLinear / QLoraLinear, DoraLinear, MultiLoraLinear,
LoraExperts.
"""
