"""Random Tandem models whose secondary and drafter often agree with the primary (so that
speculative blocks accept a mix of 0..γ drafts), for the engine tests."""
from __future__ import annotations

import torch

from conftest import tiny_model_config
from tandem_rt.config import RouterConfig, TandemConfig
from tandem_rt.models import TandemModel
from tandem_rt.models.random_init import make_agreeing_, randomize_


def agreeing_tandem_model(seed=0, vocab_size=61, layer_scale=0.35, router=True, drafter=True,
                          max_position_embeddings=256, head_dim=None, feature=False,
                          projection_embed=False) -> TandemModel:
    """All three models share the embedding (tied LM heads) and final norm; their layers add
    random updates scaled by ``layer_scale`` to a residual stream dominated by the embedding, so
    next-token predictions overlap but differ. The secondary reads the primary through random
    projections near the identity. ``head_dim`` (default 8) must be 32/64/128 for CUDA kernels.
    ``feature``: with the feature input on the primary's last layer (random ``W_f``): ``True`` or
    ``"input"`` adds it to the secondary's input embeddings, ``"output"`` to its last residual,
    ``"mlp-output"``: a feature MLP (hidden 24) added to the last residual. ``projection_embed``:
    token-anchored projections (the primary-derived residuals add the token embeddings)."""
    kw = dict(max_position_embeddings=max_position_embeddings, head_dim=head_dim)
    primary = tiny_model_config(vocab_size, hidden_size=32, layers=3, heads=4, kv_heads=2,
                                intermediate_size=64, tie=True, bias=True, **kw)
    small = dict(hidden_size=32, layers=2, heads=4, kv_heads=1, intermediate_size=48, tie=True, **kw)
    secondary = tiny_model_config(vocab_size, **small)
    drafter_cfg = tiny_model_config(vocab_size, **small) if drafter else None
    router_cfg = RouterConfig(embed_dim=32, top_k=3, hidden_size=16, threshold=0.5, gamma_max=6) if router else None
    cfg = TandemConfig(primary=primary, secondary=secondary, drafter=drafter_cfg, router=router_cfg,
                       torch_dtype="float32", layer_map=[2, 3], feature_layer=3 if feature else None,
                       feature_at="output" if str(feature).endswith("output") else "input",
                       feature_hidden=24 if str(feature).startswith("mlp") else None,
                       projection_embed=projection_embed)
    torch.manual_seed(seed)
    model = TandemModel(cfg)
    randomize_(model, 0.3, norm_range=(0.8, 1.2), vector_std=0.1)
    make_agreeing_(model, layer_scale, share_norm=True, proj_noise=0.1)
    if feature:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1000)
            f = model.tandem.feature
            f.proj.weight.copy_(torch.randn(f.proj.weight.shape, generator=g) * 0.3)
            f.norm.weight.copy_(1.0 + 0.2 * torch.rand(f.norm.weight.shape, generator=g))
    with torch.no_grad():
        if router:
            # centre the router's output so that drafting stops at different lengths
            feats = torch.randn(256, cfg.router.num_features)
            model.router.fc2.bias.sub_(model.router.logit(feats).median())
    return model.eval()
