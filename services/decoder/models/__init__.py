"""The language-model half of InternVL checkpoints, with tensor-parallel layers."""
