"""Write this host's asv machine record (~/.asv-machine.json) and print the machine name.

asv records os/arch/cpu/ram but no GPU. A GPU host is named after its card (h100-sxm, h200,
...) so different cards never share a series, and its record carries the GPU name, memory,
driver, CUDA and torch versions. A CPU host is named cpu-<cores>c-<arch>.

    python tools/asv_machine.py            # prints the name it wrote
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path


def gpu_identity() -> dict[str, str] | None:
    """Name, memory and driver of GPU 0 from nvidia-smi, or None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, memory, driver = (s.strip() for s in out[0].split(","))
    info = {"gpu": name, "gpu_memory": memory, "gpu_count": str(len(out)), "driver": driver}
    try:
        import torch

        info["cuda"] = str(torch.version.cuda)
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def machine_name(gpu: dict[str, str] | None) -> str:
    if gpu is None:
        return f"cpu-{os.cpu_count()}c-{platform.machine()}"
    name = gpu["gpu"].upper()
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100-pcie" if "PCIE" in name else "h100-sxm"
    return re.sub(r"[^a-z0-9]+", "-", gpu["gpu"].lower().replace("nvidia", "")).strip("-")


def main() -> None:
    gpu = gpu_identity()
    name = os.environ.get("ESMFLASH_ASV_MACHINE") or machine_name(gpu)
    path = Path.home() / ".asv-machine.json"
    records = json.loads(path.read_text()) if path.is_file() else {"version": 1}
    record = {
        "machine": name,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "num_cpu": str(os.cpu_count()),
        "ram": str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
    }
    if gpu:
        record.update(gpu)
    records[name] = record
    path.write_text(json.dumps(records, indent=4))
    print(name)


if __name__ == "__main__":
    main()
