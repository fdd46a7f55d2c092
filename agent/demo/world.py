"""The demo's synthetic world: users, card transactions, and how likely each is fraud.

Shared by the feature store (which knows each user's account) and the traffic generator
(which makes transactions and, later, tells the truth about them).

    world = World(seed=7)
    batch = world.transactions(20, drifted=False)      # dict of numpy columns + user ids
    p = fraud_probability(batch["amount"], account_age_days(batch["user_id"]), ...)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.demo import MODEL, VERSION

__all__ = ["MODEL", "VERSION", "World", "account_age_days", "fraud_probability"]
MERCHANTS = ("grocery", "travel", "electronics", "fuel", "online")
# The new market of the drift phases shops online and for electronics (PSI ~1 against the
# healthy uniform mix): with the amounts, two of the model's four features drift, so the
# dataset drift share holds at >= 0.5 through the drifted phases, not for a moment.
DRIFTED_MERCHANT_MIX = (0.05, 0.05, 0.3, 0.05, 0.55)
USERS = 5_000
# The user table must be the same in every process (feature store, traffic): fixed seed.
_USER_SEED = 20_261_205
_ACCOUNT_AGE = np.random.default_rng(_USER_SEED).gamma(2.0, 200.0, USERS)
# What the feature store answers when it cannot say (and the model imputes on fallback).
DEFAULT_ACCOUNT_AGE_DAYS = 400.0

# The true model of the healthy world; the demo model was "trained" on it, so it is calibrated.
INTERCEPT = -3.2
W_AMOUNT = 0.012  # per currency unit above 30
W_AGE = -0.003  # per day of account age
W_NIGHT = 0.8  # 0:00-6:00
W_ONLINE = 1.2


def account_age_days(user_ids: np.ndarray) -> np.ndarray:
    """Each user's account age in days (what the feature store serves)."""
    return np.asarray(_ACCOUNT_AGE[np.asarray(user_ids, dtype=np.int64) % USERS])


def fraud_logit(
    amount: np.ndarray, age_days: np.ndarray, hour: np.ndarray, merchant: np.ndarray
) -> np.ndarray:
    age = np.where(np.isfinite(age_days), age_days, DEFAULT_ACCOUNT_AGE_DAYS)
    night = (hour < 6).astype(float)
    online = (merchant == "online").astype(float)
    return (
        INTERCEPT + W_AMOUNT * (amount - 30.0) + W_AGE * age + W_NIGHT * night + W_ONLINE * online
    )


def fraud_probability(
    amount: np.ndarray, age_days: np.ndarray, hour: np.ndarray, merchant: np.ndarray
) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-fraud_logit(amount, age_days, hour, merchant))))


class World:
    """Draws transactions; ``drifted`` is a new market: larger amounts, another merchant mix."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def transactions(self, n: int, *, drifted: bool) -> dict[str, Any]:
        rng = self.rng
        # Healthy: median ~33; drifted: median ~90 (a feature drifts, PSI well above 0.25).
        amount = rng.lognormal(4.5 if drifted else 3.5, 0.8, n).round(2)
        hour = rng.integers(0, 24, n).astype(float)
        kinds = (
            rng.choice(len(MERCHANTS), n, p=DRIFTED_MERCHANT_MIX)
            if drifted
            else rng.integers(0, len(MERCHANTS), n)
        )
        merchant = np.asarray(MERCHANTS)[kinds]
        user_id = rng.integers(0, USERS, n)
        return {"amount": amount, "hour": hour, "merchant": merchant, "user_id": user_id}

    def truth(self, columns: dict[str, Any], *, fraud_ring: bool) -> np.ndarray:
        """Whether each transaction really was fraud. During a fraud ring most are, whatever
        the model learnt: accuracy on joined outcomes falls well below 60 %."""
        n = len(columns["amount"])
        if fraud_ring:
            p = np.full(n, 0.7)
        else:
            p = fraud_probability(
                columns["amount"],
                account_age_days(columns["user_id"]),
                columns["hour"],
                columns["merchant"],
            )
        return np.asarray(self.rng.random(n) < p)
