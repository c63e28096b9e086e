"""`UPNConfig`: every size of the UPN model (Swin backbone + two-stage deformable DETR), with presets.

Field names follow the contract in architecture.md. Presets:
- ``"large"``: the reference ``upn_large.py`` (Swin-L 384/22k backbone, 6/6 layers, 900 queries).
- ``"small"``: the parity-fixture config (``golden/upn_small/small_config.json``).
- ``"tiny"``: a fast config for tests and for the tiny model trained on 160-320 px synthetic images
  (embed 32, depths 2/2/2/2, window 7, d_model 64, 1 encoder / 3 decoder layers, 200 queries).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from chatrex.errors import ConfigError


@dataclass(frozen=True)
class UPNConfig:
    """Sizes of a UPN model. Lists are stored as tuples so the config is hashable.

    Swin: ``embed_dim`` (stage-0 channels; stage i has ``embed_dim * 2**i``), ``depths`` and
    ``num_heads`` (one entry per stage), ``window_size``, ``patch_size``, ``mlp_ratio``.
    Transformer: ``d_model``, ``d_ffn``, ``n_heads``, ``n_levels`` (feature levels fed to the
    encoder: the last ``min(n_levels, stages)`` Swin stages plus stride-2 convs for the rest),
    ``n_points`` (sampling points per head and level), ``enc_layers``, ``dec_layers``,
    ``num_queries``, ``gn_groups`` (GroupNorm groups in the input projections), ``query_nms`` (0: the
    reference top-k selection; > 0: the two-stage selection skips tokens whose proposal box overlaps a
    better one by IoU > query_nms, see ``chatrex.upn.transformer.distinct_topk``).
    """

    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    d_model: int = 256
    d_ffn: int = 2048
    n_heads: int = 8
    n_levels: int = 5
    n_points: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    num_queries: int = 900
    patch_size: int = 4
    mlp_ratio: float = 4.0
    gn_groups: int = 32
    query_nms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("depths", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ConfigError(f"UPNConfig.{name} must be a sequence of ints, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        self._validate()

    def _validate(self) -> None:
        positive = ("embed_dim", "window_size", "d_model", "d_ffn", "n_heads", "n_levels", "n_points",
                    "dec_layers", "num_queries", "patch_size", "gn_groups")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"UPNConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.enc_layers, int) or self.enc_layers < 0:
            raise ConfigError(f"UPNConfig.enc_layers must be an int >= 0, got {self.enc_layers!r}")
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ConfigError(f"UPNConfig.depths {self.depths} and num_heads {self.num_heads} must be "
                              "non-empty and of the same length (one entry per Swin stage)")
        if any(d < 1 for d in self.depths) or any(h < 1 for h in self.num_heads):
            raise ConfigError("UPNConfig.depths and num_heads entries must be >= 1")
        for i, heads in enumerate(self.num_heads):
            if self.stage_dims[i] % heads:
                raise ConfigError(f"Swin stage {i} has {self.stage_dims[i]} channels, not divisible by "
                                  f"num_heads[{i}]={heads}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ConfigError(f"d_model={self.d_model} must be even (half the channels encode y, half x)")
        if not 0.0 <= float(self.query_nms) < 1.0:
            raise ConfigError(f"UPNConfig.query_nms must be in [0, 1), got {self.query_nms!r}")
        if self.d_model % self.gn_groups:
            raise ConfigError(f"d_model={self.d_model} must be divisible by gn_groups={self.gn_groups}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"UPNConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of every Swin stage output: ``embed_dim * 2**i``."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def out_indices(self) -> tuple[int, ...]:
        """Swin stages that feed the transformer (the last ``min(n_levels, stages)`` ones)."""
        n_stages = len(self.depths)
        return tuple(range(n_stages - min(self.n_levels, n_stages), n_stages))

    # ------------------------------------------------------------------ presets / serialization
    @classmethod
    def from_name(cls, name: str) -> "UPNConfig":
        """A named preset: ``"large"``, ``"small"`` or ``"tiny"``."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown UPN config preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**_PRESETS[name])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UPNConfig":
        """Build from ``to_dict()`` output; unknown keys raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown UPNConfig fields {unknown}; known: {sorted(names)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_reference_config(cls, cfg: Mapping[str, Any]) -> "UPNConfig":
        """Read the reference mmengine-style dict (like ``small_config.json``) into a UPNConfig."""
        try:
            swin = cfg["vision_backbone_cfg"]["backbone_cfg"]
            tr = cfg["transformer_cfg"]
            enc, dec = tr["encoder_cfg"], tr["decoder_cfg"]
            enc_layer = enc["encoder_layer_cfg"]
            return cls(
                embed_dim=swin["embed_dim"], depths=swin["depths"], num_heads=swin["num_heads"],
                window_size=swin["window_size"], patch_size=swin.get("patch_size", 4),
                mlp_ratio=swin.get("mlp_ratio", 4.0), d_model=enc_layer.get("d_model", 256),
                d_ffn=enc_layer.get("d_ffn", 1024), n_heads=enc_layer.get("n_heads", 8),
                n_levels=tr.get("num_feature_levels", 5), n_points=enc_layer.get("n_points", 4),
                enc_layers=enc["num_layers"], dec_layers=dec["num_layers"],
                num_queries=cfg.get("num_queries", tr.get("num_queries", 900)),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"not a reference UPN config dict (missing {exc})") from exc


_PRESETS: dict[str, dict[str, Any]] = {
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
                  d_model=256, d_ffn=2048, n_heads=8, n_levels=5, n_points=4, enc_layers=6,
                  dec_layers=6, num_queries=900),
    "small": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=12,
                  d_model=256, d_ffn=512, n_heads=8, n_levels=5, n_points=4, enc_layers=2,
                  dec_layers=3, num_queries=900),
    "tiny": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                 d_model=64, d_ffn=256, n_heads=4, n_levels=5, n_points=4, enc_layers=1,
                 dec_layers=3, num_queries=200),
}
