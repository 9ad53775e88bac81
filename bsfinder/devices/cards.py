"""GPU presets for planning (``bsfinder estimate --target h100-80gb``): the memory a CUDA
process can really use on each card, from public sources.

A card's marketing size is not what a training process gets:

- ``nvidia-smi``'s total (NVML) is the card's memory in MiB (an "80GB" H100 shows 81559 MiB).
- The driver reserves part of it: ``nvidia-smi -q`` shows ``Reserved`` of 328 to 700 MiB
  on recent drivers. CUDA (``cudaMemGetInfo``, ``torch.cuda.get_device_properties(0)
  .total_memory``) reports the total without it. For example, an A100-SXM4-40GB has
  ``Total : 40960 MiB / Reserved : 620 MiB`` in ``nvidia-smi -q``, and deviceQuery gives
  ``Total amount of global memory: 40339 MBytes (42298834944 bytes)``
  (https://github.com/bottlerocket-os/bottlerocket/pull/3873). Where a source gives CUDA's
  total, the preset uses it; otherwise ``nvidia-smi``'s total less :data:`RESERVED_MIB`.
- The CUDA context comes off the top: "around 400MB if CUDA >= 11.7 is used and lazy module
  loading enabled (default in PyTorch)" (ptrblck,
  https://github.com/pytorch/pytorch/issues/109888), about 650 MiB without lazy loading
  (https://github.com/pytorch/pytorch/pull/86509). The estimate adds its own context (512
  MiB by default: :data:`bsfinder.memory.estimate.DEFAULT_CUDA_CONTEXT`) to every peak.

The numbers move with the driver (Paddle's docs show ``total_memory=40536MB`` for the same
A100-40GB on an older stack): a preset is a plan, and the probe on the card is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from bsfinder.errors import SpecError

__all__ = ["CARDS", "RESERVED_MIB", "Card", "card"]

MIB = 2**20
#: what the driver reserves where no source gives CUDA's own total: the largest of the
#: ``Reserved`` values seen in public ``nvidia-smi -q`` dumps of H100s (328-516 MiB), rounded
#: up; an H200 dump showed 700
RESERVED_MIB = 512


@dataclass(frozen=True)
class Card:
    """One GPU's memory as a training process sees it.

    Attributes:
        name: the preset (``"h100-80gb"``). label: the card as ``nvidia-smi`` names it.
        smi_mib: ``nvidia-smi``'s total, in MiB.
        cuda_total_mib: CUDA's total (``torch.cuda.get_device_properties(0).total_memory``
            in MiB), where a public source shows it; None: ``smi_mib - RESERVED_MIB``.
        sources: where the numbers come from (URLs, with the quoted text).
    """

    name: str
    label: str
    smi_mib: int
    cuda_total_mib: int | None
    sources: tuple[str, ...]

    @property
    def usable_bytes(self) -> int:
        """The memory a CUDA process has, before its context: CUDA's total."""
        if self.cuda_total_mib is not None:
            return self.cuda_total_mib * MIB
        return (self.smi_mib - RESERVED_MIB) * MIB


_MODAL = (
    "https://github.com/modal-labs/modal-client/pull/2797 (a table of nvidia-smi totals: {quote})"
)

#: the presets, by name
CARDS: dict[str, Card] = {
    c.name: c
    for c in (
        Card("h100-80gb", "NVIDIA H100 80GB HBM3", 81559, None, (
            "https://github.com/NVIDIA/nccl/issues/1264 ('NVIDIA H100 80GB HBM3 ... 0MiB / "
            "81559MiB', driver 550.54.15)",
            _MODAL.format(quote="'H100: 81559MiB (85.52 GB)'"),
        )),
        Card("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920, None, (
            _MODAL.format(quote="'A100 80GB: 81920MiB (85.89 GB)'"),
        )),
        Card("a100-40gb", "NVIDIA A100-SXM4-40GB", 40960, 40339, (
            _MODAL.format(quote="'A100 40GB: 40960MiB (42.94 GB)'"),
            "https://github.com/bottlerocket-os/bottlerocket/pull/3873 (deviceQuery: 'Total "
            "amount of global memory: 40339 MBytes (42298834944 bytes)')",
        )),
        Card("l40s", "NVIDIA L40S", 46068, None, (
            "https://github.com/akash-network/provider-configs/pull/99 ('NVIDIA L40S, "
            "595.71.05, 46068 MiB')",
        )),
        Card("l4", "NVIDIA L4", 23034, None, (
            "https://github.com/speaches-ai/speaches/pull/438 ('NVIDIA L4 ... 0MiB / "
            "23034MiB', driver 570.133.20)",
        )),
        Card("a10", "NVIDIA A10", 23028, None, (
            _MODAL.format(quote="'A10: 23028MiB (24.15 GB)'"),
            "https://github.com/mayooot/detect-gpu/issues/3 (NVML 'Total':24146608128 bytes)",
        )),
        Card("t4", "Tesla T4", 15360, None, (_MODAL.format(quote="'T4: 15360MiB (16.11 GB)'"),)),
        Card("v100-16gb", "Tesla V100-SXM2-16GB", 16384, None, (
            "https://github.com/1CatAI/1Cat-vLLM/issues/85 ('Tesla V100-SXM2-16GB ... 5MiB / "
            "16384MiB')",
        )),
        Card("v100-32gb", "Tesla V100-SXM2-32GB", 32768, None, (
            "https://github.com/Wan-Video/Wan2.1/issues/5 ('Tesla V100-SXM2... 308MiB / "
            "32768MiB')",
        )),
        Card("rtx-4090", "NVIDIA GeForce RTX 4090", 24564, 24207, (
            "https://github.com/RLinf/RLinf/issues/255 ('NVIDIA GeForce RTX 4090 ... 507MiB / "
            "24564MiB')",
            "https://github.com/3DTopia/Phidias-Diffusion/issues/8 (torch: 'GPU 0 has a "
            "total capacty of 23.64 GiB')",
        )),
        Card("rtx-3090", "NVIDIA GeForce RTX 3090", 24576, None, (
            "https://github.com/noonghunna/club-3090/issues/1127 ('NVIDIA GeForce RTX 3090 "
            "... 22591MiB / 24576MiB')",
        )),
    )
}  # fmt: skip


def card(name: str) -> Card:
    """The preset called ``name`` (case-insensitive).

    Raises:
        SpecError: no such preset (the message lists them).
    """
    found = CARDS.get(name.lower())
    if found is None:
        raise SpecError(
            f"no card preset {name!r}: use one of {', '.join(CARDS)}, or --target cuda with "
            "--target-memory (the total torch.cuda.get_device_properties(0).total_memory "
            "reports on your card)"
        )
    return found
