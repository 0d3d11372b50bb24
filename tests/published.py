"""The published CogVideoX transformer configs (THUDM / zai-org diffusers repos), shared by the loading and
format tests; tests shrink ``num_layers`` where the full depth is not the point."""

PUBLISHED_CONFIGS = {
    "2b": dict(num_attention_heads=30, num_layers=30),
    "5b": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    "5b-i2v": dict(num_attention_heads=48, num_layers=42, in_channels=32, use_rotary_positional_embeddings=True,
                   use_learned_positional_embeddings=True),
    "1.5-5b": dict(num_attention_heads=48, num_layers=42, patch_size_t=2, patch_bias=False, sample_height=300,
                   sample_width=300, sample_frames=81, use_rotary_positional_embeddings=True),
    "1.5-5b-i2v": dict(num_attention_heads=48, num_layers=42, in_channels=32, patch_size_t=2, patch_bias=False,
                       sample_height=300, sample_width=300, sample_frames=81, ofs_embed_dim=512,
                       use_rotary_positional_embeddings=True),
}
