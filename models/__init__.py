"""mla_edge.models: the MLA decoder, its config, the latent-cache contract and checkpoint I/O."""
