"""Prompt embeddings on disk, keyed by model identity + prompt hash, so the text encoders of a
real-scale backend can be unloaded while training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rtdmd.errors import UserError

def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class PromptCache:
    """Prompt embeddings on disk (one safetensors file per prompt) with an in-memory LRU.

    The namespace (model identity + encoder settings) is hashed into the directory name, so
    embeddings of another model or another max_sequence_length are never mixed in.
    """

    def __init__(self, root: str | Path | None, namespace: str, memory_mb: int = 1024):
        self.namespace = namespace
        ns = hashlib.sha256(namespace.encode()).hexdigest()[:20]
        self.dir = Path(root).expanduser() / ns if root else None
        self.memory_bytes = max(0, int(memory_mb)) << 20
        self._mem: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._mem_used = 0
        self.hits = 0
        self.misses = 0
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                info = self.dir / "namespace.json"
                if not info.is_file():
                    info.write_text(json.dumps({"namespace": namespace}, indent=1) + "\n")
            except OSError:
                raise UserError(f"cannot create the prompt-embedding cache {self.dir}; set backend.prompt_cache_dir to a "
                                "writable directory (or '' to keep embeddings in memory only).") from None

    def _file(self, h: str) -> Path:
        return self.dir / h[:2] / f"{h}.safetensors"

    def _remember(self, h: str, row: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in row.values())
        if size > self.memory_bytes:
            return
        self._mem[h] = row
        self._mem_used += size
        while self._mem_used > self.memory_bytes:
            _, old = self._mem.popitem(last=False)
            self._mem_used -= sum(t.numel() * t.element_size() for t in old.values())

    def get(self, prompt: str) -> dict[str, torch.Tensor] | None:
        """One prompt's embeddings (CPU tensors without the batch dim) or None."""
        h = prompt_hash(prompt)
        row = self._mem.get(h)
        if row is not None:
            self._mem.move_to_end(h)
            self.hits += 1
            return row
        if self.dir is not None and self._file(h).is_file():
            try:
                row = load_file(str(self._file(h)))
            except Exception:  # a truncated file from a killed writer: re-encode
                row = None
            if row is not None:
                self._remember(h, row)
                self.hits += 1
                return row
        self.misses += 1
        return None

    def put(self, prompt: str, row: dict[str, torch.Tensor]) -> None:
        row = {k: v.detach().to("cpu").contiguous() for k, v in row.items()}
        h = prompt_hash(prompt)
        self._remember(h, row)
        if self.dir is not None:
            f = self._file(h)
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            save_file(row, str(tmp), metadata={"prompt": prompt[:2000]})
            os.replace(tmp, f)  # atomic: processes sharing the cache never read half a file
