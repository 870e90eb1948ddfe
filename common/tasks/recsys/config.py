"""The recommender's ``[recsys]`` config table and its declarations (light: the config reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.limits import SITE_PARTITION
from common.config.rules import TaskSpec
from common.errors import ConfigError

# Values of recsys.model; common.tasks.recsys.model.MODELS builds each (a test checks they agree).
MODEL_NAMES = ("mf", "neural", "bias")
DATA_SOURCES = ("synthetic", "movielens", "csv")

CORRECTIONS = ("none", "group-offset")


@dataclass(frozen=True)
class RecsysConfig:
    model: str = "mf"  # mf | neural | bias (no factors: the baseline)
    dim: int = 8
    hidden_dim: int = 32
    # Rows of the shared item table; items are hashed into them (collision rate ~ items/buckets).
    num_buckets: int = 131072
    init_std: float = 0.1
    # L2 penalty per rating on the embeddings and biases it touches (classic MF regularisation).
    l2: float = 0.0
    rating_min: float = 1.0
    rating_max: float = 5.0
    top_k: int = 10
    # k: smaller groups are not sent by sites nor reported by the server.
    min_group_size: int = 10
    synthetic_users: int = 600
    synthetic_items: int = 300
    synthetic_ratings_per_user: int = 40
    # The synthetic generator's rating scale: centre (before user/item effects) and the per-rating
    # noise's standard deviation and skew-normal shape (0: Gaussian; < 0: a tail toward low
    # ratings). The defaults give the same data as before these keys existed.
    synthetic_center: float = 3.5
    synthetic_noise: float = 0.5
    synthetic_skew: float = 0.0
    # Bias correction: none | group-offset (a gender x item offset trained inside DP-SGD).
    correction: str = "none"
    # Decay of the offset table after every local step, b <- b / (1 + lr * lambda): offsets
    # without a consistent signal (rare cells, DP noise) fade to 0. 0 = no decay.
    correction_lambda: float = 0.1
    # Fixed multipliers on the tables (value = scale x stored weight; the initial values are
    # the same whatever the scale). Under DP-SGD a scale s gives its table s^2 of the clipped
    # per-rating gradient's squared norm and moves its values s^2 as fast, while the noise is
    # the same on every stored coordinate: a data-independent preconditioner that shares the
    # clipping budget between the global mean, the user and item biases and the factors.
    global_scale: float = 1.0
    user_bias_scale: float = 1.0
    item_bias_scale: float = 1.0
    factor_scale: float = 1.0

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"recsys.{key}", msg)

        need(self.model in MODEL_NAMES, "model", f"must be one of {', '.join(MODEL_NAMES)}, got {self.model!r}")
        need(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")
        need(self.hidden_dim >= 1, "hidden-dim", f"must be >= 1, got {self.hidden_dim}")
        need(2 <= self.num_buckets <= 2**24, "num-buckets", f"must be in [2, 2^24], got {self.num_buckets}")
        need(self.init_std > 0, "init-std", f"must be > 0, got {self.init_std}")
        need(self.l2 >= 0, "l2", f"must be >= 0, got {self.l2}")
        need(self.rating_min < self.rating_max, "rating-max", f"must be > recsys.rating-min, got {self.rating_max}")
        need(self.top_k >= 1, "top-k", f"must be >= 1, got {self.top_k}")
        need(self.min_group_size >= 1, "min-group-size", f"must be >= 1, got {self.min_group_size}")
        need(self.synthetic_users >= 2, "synthetic-users", f"must be >= 2, got {self.synthetic_users}")
        need(self.synthetic_items >= 2, "synthetic-items", f"must be >= 2, got {self.synthetic_items}")
        need(
            2 <= self.synthetic_ratings_per_user <= self.synthetic_items,
            "synthetic-ratings-per-user",
            f"must be in [2, recsys.synthetic-items], got {self.synthetic_ratings_per_user}",
        )
        need(
            self.rating_min <= self.synthetic_center <= self.rating_max,
            "synthetic-center",
            f"must be in [recsys.rating-min, recsys.rating-max], got {self.synthetic_center}",
        )
        need(self.synthetic_noise >= 0, "synthetic-noise", f"must be >= 0, got {self.synthetic_noise}")
        need(abs(self.synthetic_skew) <= 100, "synthetic-skew", f"must be in [-100, 100], got {self.synthetic_skew}")
        need(
            self.correction in CORRECTIONS,
            "correction",
            f"must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}",
        )
        for key, value in (
            ("global-scale", self.global_scale),
            ("user-bias-scale", self.user_bias_scale),
            ("item-bias-scale", self.item_bias_scale),
            ("factor-scale", self.factor_scale),
        ):
            need(value > 0, key, f"must be > 0, got {value}")
        need(self.correction_lambda >= 0, "correction-lambda", f"must be >= 0, got {self.correction_lambda}")


SPEC = TaskSpec(
    name="recsys",
    config_cls=RecsysConfig,
    data_sources=DATA_SOURCES,
    person_sources=DATA_SOURCES,  # every rating names its user
    partitions=("region", "iid", SITE_PARTITION),
    primary_metric="rmse",
)
