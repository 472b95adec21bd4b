"""Models: the Leviathan embedding generator and a Megatron-style GPT built on megatron-core's
tensor-parallel layers."""
