"""The Wan models: the DiT, the umT5 text encoder and its tokenizer, the Wan2.1 and Wan2.2 VAEs.

Model files only; community-layout writers and tiny random weights are in `engine.wan.convert`.
"""
