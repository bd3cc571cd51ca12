"""A mesh plus a sharding strategy: the layout of a whole training step.

    plan = Plan.create("data=2,fsdp=2,tensor=2", "auto")
    state = plan.init_state(model_cfg, train_cfg, key)          # born sharded, never whole on one device
    step = make_train_step(model_cfg, train_cfg, plan=plan)      # params / grads / optimizer / activations per plan

Parameters, gradients and optimizer state each follow their own rules (ZeRO-1 keeps parameters
whole and cuts the optimizer state; ZeRO-2 also cuts gradients, which turns their all-reduce into a
reduce-scatter; FSDP cuts all three). Activations are constrained at block boundaries by the
strategy's activation rules.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.config import ModelConfig, TrainConfig
from llmjax.model.transformer import model_spec
from llmjax.parallel.logical import activation_rules, axis_ways, partition_spec
from llmjax.parallel.mesh import make_mesh
from llmjax.parallel.rules import Strategy, get_strategy, spec_shardings
from llmjax.train.optim import make_optimizer
from llmjax.train.state import TrainState, init_train_state, train_state_from_params


class BatchError(ValueError):
    """A batch that does not split over the data-parallel devices."""


@dataclass(frozen=True)
class Plan:
    mesh: Mesh
    strategy: Strategy

    @classmethod
    def create(cls, mesh: str | dict | Mesh | None = None, strategy: str | Strategy = "auto", devices=None) -> "Plan":
        """mesh: '--mesh' text ('data=2,fsdp=-1'), axis sizes, or a Mesh (default: data over all devices)."""
        mesh = mesh if isinstance(mesh, Mesh) else make_mesh(mesh, devices)
        return cls(mesh, get_strategy(strategy))

    def describe(self) -> str:
        axes = ", ".join(f"{name}={size}" for name, size in self.mesh.shape.items() if size > 1) or "one device"
        return f"mesh {axes}, sharding {self.strategy.name}"

    # --- parameters, gradients, optimizer state -------------------------------------------

    def param_shardings(self, model_cfg: ModelConfig):
        return spec_shardings(model_spec(model_cfg), self.mesh, self.strategy.params)

    def gradient_shardings(self, model_cfg: ModelConfig):
        return spec_shardings(model_spec(model_cfg), self.mesh, self.strategy.gradients)

    def optimizer_shardings(self, model_cfg: ModelConfig, train_cfg: TrainConfig):
        """The optimizer state's shardings: moments follow the optimizer rules, counters are replicated."""
        optimizer = make_optimizer(train_cfg, model_cfg=model_cfg)
        abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), model_spec(model_cfg),
                                       is_leaf=lambda x: hasattr(x, "axes"))
        abstract_state = jax.eval_shape(optimizer.init, abstract_params)
        moments = spec_shardings(model_spec(model_cfg), self.mesh, self.strategy.optimizer)
        return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_state, moments,
                                     transform_non_params=lambda _: self.replicated())

    def state_shardings(self, model_cfg: ModelConfig, train_cfg: TrainConfig):
        return TrainState(self.replicated(), self.param_shardings(model_cfg),
                          self.optimizer_shardings(model_cfg, train_cfg))

    def init_state(self, model_cfg: ModelConfig, train_cfg: TrainConfig, key: jax.Array, params: dict | None = None):
        """A fresh TrainState created directly in its shards (no device ever holds the whole model); params: start
        from these (a trained or imported model, cast to the config's parameter dtype) instead of a random init."""
        shardings = self.state_shardings(model_cfg, train_cfg)
        if params is None:
            return jax.jit(init_train_state, static_argnums=(0, 1), out_shardings=shardings)(model_cfg, train_cfg, key)
        params = self.place_params(jax.tree.map(lambda x: jnp.asarray(x, model_cfg.param_dtype), params), model_cfg)
        return jax.jit(train_state_from_params, static_argnums=(1, 2), out_shardings=shardings)(params, model_cfg,
                                                                                                  train_cfg)

    def place_params(self, params: dict, model_cfg: ModelConfig) -> dict:
        """Parameters (e.g. loaded for inference) moved into this plan's shards."""
        return jax.device_put(params, self.param_shardings(model_cfg))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    # --- batches and activations ----------------------------------------------------------

    @property
    def data_parallel_size(self) -> int:
        """How many ways the batch dimension is cut."""
        return axis_ways(partition_spec(("batch",), self.strategy.activations, self.mesh)[0], self.mesh)

    def batch_sharding(self) -> NamedSharding:
        """For [batch, ...] arrays fed to the step: the batch dimension split over the data-parallel axes."""
        return NamedSharding(self.mesh, partition_spec(("batch",), self.strategy.activations, self.mesh))

    def check_batch(self, batch_size: int) -> None:
        ways = self.data_parallel_size
        if batch_size % ways:
            raise BatchError(
                f"--batch {batch_size} does not divide over the {ways} data-parallel devices of {self.describe()}; "
                f"use a multiple of {ways}"
            )

    @contextlib.contextmanager
    def activations(self):
        """Context for tracing a step that takes this plan as a static argument (so the mesh and the rules are in
        jit's cache key): `constrain` inside the model lays activations out by the plan's rules, and every
        algorithm choice (kernels/platform.compute_device) reads the platform of the plan's devices, not the
        process's first device."""
        with activation_rules(self.mesh, self.strategy.activations), jax.default_device(self.mesh.devices.flat[0]):
            yield

    def sequence_ways(self) -> int:
        return axis_ways(partition_spec(("length",), self.strategy.activations, self.mesh)[0], self.mesh)
