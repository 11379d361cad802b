"""The learning rate of every iteration, as the paper's recipes set it; both trainers use it."""

from __future__ import annotations

import math

from resnetlab.recipes import Recipe


class LrSchedule:
    """The learning rate of each iteration: milestones (CIFAR), plateaus (ImageNet), the warm-up of deep nets, and
    a linear ramp over the first iterations where a recipe asks for one."""

    def __init__(self, recipe: Recipe, warm_up: bool):
        self.recipe = recipe
        self.warming_up = warm_up
        self.train_error_ema = 1.0  # smooths the per-batch error the warm-up watches
        self.plateau_drops, self.best_error, self.evaluations_since_best = 0, math.inf, 0

    def lr(self, iteration: int) -> float:
        if self.warming_up:
            return self.recipe.warmup_lr
        drops = sum(iteration >= m for m in self.recipe.lr_milestones) + self.plateau_drops
        ramp = min(1.0, (iteration + 1) / self.recipe.ramp_iterations) if self.recipe.ramp_iterations else 1.0
        return ramp * self.recipe.lr * self.recipe.lr_decay ** drops

    def observe_batch_error(self, error: float) -> None:
        self.train_error_ema = 0.9 * self.train_error_ema + 0.1 * error
        if self.warming_up and self.train_error_ema < self.recipe.warmup_until_error:
            self.warming_up = False

    def observe_validation_error(self, error: float) -> None:
        if not self.recipe.plateau_patience:
            return
        if error < self.best_error:
            self.best_error, self.evaluations_since_best = error, 0
            return
        self.evaluations_since_best += 1
        if self.evaluations_since_best >= self.recipe.plateau_patience:
            self.plateau_drops, self.evaluations_since_best = self.plateau_drops + 1, 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("warming_up", "train_error_ema", "plateau_drops", "best_error",
                                              "evaluations_since_best")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
