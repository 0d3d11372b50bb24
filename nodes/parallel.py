"""The parallel-config node: which devices the worker pool uses and how a job is split across them."""

from __future__ import annotations

from comfy_api.latest import io

from .common import (CATEGORY, CFG_CHOICES, DEGREE_CHOICES, MEMORY_CHOICES, ParallelConfig, ParallelType,
                     check_choice)

def parse_degree(value: str) -> int | None:
    return None if value == "auto" else int(value)


def check_devices(devices: str) -> str | None:
    """None if the pool can run on ``devices``, else what is wrong (checked against the GPUs visible here)."""
    from comfyui_xdit_cogvideo.pool import PoolError, parse_devices

    try:
        parse_devices(devices, from_workflow=True)
    except PoolError as error:
        return str(error)
    return None


def device_count(devices: str) -> int | None:
    """Number of ranks the pool will have for ``devices`` (None if it cannot be parsed)."""
    from comfyui_xdit_cogvideo.pool import PoolError, parse_devices

    try:
        return parse_devices(devices).world_size
    except PoolError:
        return None


def check_config(devices: str, cfg: str, ulysses: str, ring: str) -> str | None:
    """What is wrong with a parallel config (None if the pool can run it)."""
    for error in (check_devices(devices), check_choice("cfg", cfg, CFG_CHOICES),
                  check_choice("ulysses", ulysses, DEGREE_CHOICES), check_choice("ring", ring, DEGREE_CHOICES)):
        if error:
            return error
    count = device_count(devices)
    fixed = [parse_degree(x) for x in (cfg, ulysses, ring)]
    if count is not None and None not in fixed and fixed[0] * fixed[1] * fixed[2] != count:
        return (f"cfg {cfg} x ulysses {ulysses} x ring {ring} = {fixed[0] * fixed[1] * fixed[2]} ranks, but "
                f"devices {devices!r} gives {count}; set one degree to auto")
    product = 1
    for degree in fixed:
        product *= degree or 1
    if count is not None and count % product:
        return (f"cfg {cfg} x ulysses {ulysses} x ring {ring} needs a multiple of {product} ranks, but devices "
                f"{devices!r} gives {count}")
    return None


class ParallelConfigNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        degree = ("{} degree. auto = the fastest valid split for the number of devices and the model "
                  "(cfg x ulysses x ring must equal the number of devices).")
        return io.Schema(
            node_id="XDiTCogVideoParallelConfig",
            display_name="xDiT CogVideoX Parallel Config",
            category=CATEGORY,
            description=("How the worker pool spreads a CogVideoX job over GPUs: CFG parallel (conditional and "
                         "unconditional branch on different GPUs, the cheapest), Ulysses (all-to-all over heads; "
                         "must divide the head count: 30 for 2b, 48 for 5b) and Ring (K/V passed around; any "
                         "degree). Leave everything on auto unless you are measuring."),
            inputs=[
                io.String.Input("devices", default="auto", tooltip=(
                    "Devices of the worker pool: 'auto' = every visible GPU (one CPU process if there is none), "
                    "'0,1,2,3' = these CUDA devices, 'cpu:2' = two CPU processes (testing), "
                    "'listen://0.0.0.0:29600?world=8' = wait for 8 torchrun workers, possibly on other hosts. "
                    "Changing it restarts the pool.")),
                io.Combo.Input("cfg", options=CFG_CHOICES, default="auto", tooltip=(
                    "CFG parallel degree: 2 runs the conditional and unconditional passes on two GPU groups "
                    "(needs guidance > 1). " + degree.format("CFG"))),
                io.Combo.Input("ulysses", options=DEGREE_CHOICES, default="auto", tooltip=(
                    "Ulysses sequence-parallel degree (must divide the attention heads). "
                    + degree.format("Ulysses"))),
                io.Combo.Input("ring", options=DEGREE_CHOICES, default="auto", tooltip=(
                    "Ring sequence-parallel degree (exact for any head count; more communication than "
                    "Ulysses). " + degree.format("Ring"))),
                io.Combo.Input("memory", options=MEMORY_CHOICES, default="auto", optional=True, tooltip=(
                    "Memory plan: fast = the whole model on every GPU (fastest); low = transformer weights sharded "
                    "over the GPUs (FSDP2), T5 off the GPU after encoding, decode tiles sized to fit; offload = one "
                    "GPU streams the transformer blocks from CPU memory (for cards that cannot hold it). auto = "
                    "the fastest plan that fits every GPU's free memory; a job that fits none is refused.")),
            ],
            outputs=[ParallelType.Output(display_name="parallel", tooltip="Pool devices and layout for the sampler.")],
        )

    @classmethod
    def validate_inputs(cls, devices=None):
        # ComfyUI files a failed validate_inputs under every argument it declares: declare only ``devices``;
        # the degrees and memory are combos (ComfyUI 0.33 checks them per input), checked again in execute with the
        # degrees' product against the devices.
        return (devices is not None and check_devices(devices)) or True

    @classmethod
    def execute(cls, devices="auto", cfg="auto", ulysses="auto", ring="auto", memory="auto") -> io.NodeOutput:
        error = check_choice("memory", memory, MEMORY_CHOICES) or check_config(devices, cfg, ulysses, ring)
        if error:
            raise ValueError(error)
        return io.NodeOutput(ParallelConfig(devices.strip().lower(), parse_degree(cfg), parse_degree(ulysses),
                                            parse_degree(ring), memory))
