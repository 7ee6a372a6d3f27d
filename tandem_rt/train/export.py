"""Assemble the trained parts into one :class:`TandemModel` for ``save_checkpoint``."""
from __future__ import annotations

from typing import Optional

import torch

from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.models.router import Router
from tandem_rt.models.tandem import TandemModel
from tandem_rt.train.tandem import tandem_config


def assemble(tandem: TandemModel, drafter: Optional[LlamaForCausalLM] = None, router: Optional[Router] = None,
             dtype: str = "bfloat16") -> TandemModel:
    """A new TandemModel with ``tandem``'s primary, secondary and projections, ``drafter`` as
    ``.drafter`` and ``router`` as ``.router`` (weights copied; config ``torch_dtype`` = ``dtype``).

    Raises ValueError if the drafter's or router's shape does not fit the tandem's configs.
    """
    cfg = tandem.config
    if drafter is not None and drafter.config.vocab_size != cfg.primary.vocab_size:
        raise ValueError(f"drafter vocab_size {drafter.config.vocab_size} != primary vocab_size "
                         f"{cfg.primary.vocab_size}")
    if router is not None and router.config.embed_dim != cfg.secondary.hidden_size:
        raise ValueError(f"router embed_dim {router.config.embed_dim} != secondary hidden_size "
                         f"{cfg.secondary.hidden_size}")
    new_cfg = tandem_config(cfg.primary, cfg.secondary, drafter=False, block_length=cfg.train_block_length,
                            dtype=dtype)
    new_cfg.layer_map = list(cfg.layer_map)
    new_cfg.projection_bias = cfg.projection_bias
    new_cfg.drafter = drafter.config if drafter is not None else None
    new_cfg.router = router.config if router is not None else None
    model = TandemModel(new_cfg)
    with torch.no_grad():
        model.primary.load_state_dict(tandem.primary.state_dict())
        model.secondary.load_state_dict(tandem.secondary.state_dict())
        model.tandem.load_state_dict(tandem.tandem.state_dict())
        if drafter is not None:
            model.drafter.load_state_dict(drafter.state_dict())
        if router is not None:
            model.router.load_state_dict(router.state_dict())
    return model.eval()
