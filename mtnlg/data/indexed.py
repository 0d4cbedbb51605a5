"""Memory-mapped indexed datasets: PREFIX.bin (token ids) + PREFIX.idx (index).

.idx layout (little-endian), 64-byte header then the document offsets:

    offset size  field
    0      8     magic b"MTNLGIDX"
    8      4     version (uint32, currently 1)
    12     1     dtype code (1 = uint16, 2 = uint32)
    13     3     zero padding
    16     8     num_docs (uint64)
    24     8     num_tokens (uint64)
    32     8     vocab_size (uint64)
    40     8     eod_id (int64, -1 when unknown)
    48     8     tokenizer fingerprint (8 bytes)
    56     4     CRC-32 of the .bin file
    60     4     CRC-32 of header bytes 0..55 and of the offsets array
    64     8*(num_docs+1)  token offset of each document start, int64; the last
                           entry is num_tokens; lengths are the differences.

.bin is the token ids back to back in the header's dtype (the smallest that
holds the vocabulary). Like Megatron's MMapIndexedDataset, in spirit: one flat
token array plus per-document pointers, both mmap-able.

Writes go to temporary names; .bin is renamed into place before .idx, and the
.idx records the size and checksum of its .bin, so an interrupted run never
leaves a pair that opens as complete.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array

import numpy as np

from mtnlg.errors import UserError

MAGIC = b"MTNLGIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIB3xQQQq8sII")
HEADER_SIZE = _HEADER.size  # 64
DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
VERIFY_BIN_MAX_BYTES = 1 << 30  # full .bin checksum on open up to 1 GiB ("auto")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return DTYPES[1] if vocab_size <= 65536 else DTYPES[2]


def _code(dtype: np.dtype) -> int:
    return next(code for code, d in DTYPES.items() if d == dtype)


def _crc_file(path: str, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class IndexedDatasetWriter:
    """Append documents, then ``finalize()``; use as a context manager.

    Leaving the ``with`` block on an exception deletes the temporary files.
    """

    def __init__(self, prefix: str, vocab_size: int, eod_id: int = -1, fingerprint: bytes = b"\0" * 8):
        self.prefix = prefix
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size, self.eod_id, self.fingerprint = vocab_size, eod_id, fingerprint
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp, self._idx_tmp = prefix + ".bin" + suffix, prefix + ".idx" + suffix
        self._bin = open(self._bin_tmp, "wb")
        self._offsets = array("q", [0])
        self._crc = 0
        self.finalized = False

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def add_document(self, ids) -> None:
        tokens = np.asarray(ids)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._offsets.append(self._offsets[-1] + tokens.size)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        offsets = np.frombuffer(self._offsets, dtype=np.int64).tobytes()
        head = _HEADER.pack(MAGIC, VERSION, _code(self.dtype), self.num_docs, self.num_tokens,
                            self.vocab_size, self.eod_id, self.fingerprint, self._crc, 0)[:56]
        body_crc = zlib.crc32(offsets, zlib.crc32(head[:56]))
        with open(self._idx_tmp, "wb") as f:
            f.write(head + struct.pack("<II", self._crc, body_crc) + offsets)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")
        self.finalized = True

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.finalized:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view: ``len(ds)`` documents, ``ds[i]`` token ids.

    ``verify``: True checks the .bin checksum, False only its size, "auto"
    checks the checksum when the .bin is at most 1 GiB.
    """

    def __init__(self, prefix: str, verify: bool | str = "auto"):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(f"dataset file {path} is missing (run `mtnlg preprocess --output {prefix}`)")
        with open(idx_path, "rb") as f:
            raw = f.read()
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise UserError(f"{idx_path} is not an mtnlg index file (bad magic); re-run `mtnlg preprocess`")
        (_, version, code, num_docs, num_tokens, vocab, eod, fingerprint, bin_crc, body_crc) = \
            _HEADER.unpack_from(raw)
        if version != VERSION:
            raise UserError(f"{idx_path} has format version {version}; this mtnlg reads version {VERSION}. "
                            "Re-run `mtnlg preprocess` with this version.")
        expected = HEADER_SIZE + 8 * (num_docs + 1)
        if len(raw) != expected:
            raise UserError(f"{idx_path} is truncated or corrupt: {len(raw)} bytes, expected {expected}")
        if zlib.crc32(raw[HEADER_SIZE:], zlib.crc32(raw[:56])) != body_crc:
            raise UserError(f"{idx_path} fails its checksum (corrupt); re-run `mtnlg preprocess`")
        if code not in DTYPES:
            raise UserError(f"{idx_path} names unknown dtype code {code}")
        self.dtype = DTYPES[code]
        size = os.path.getsize(bin_path)
        if size != num_tokens * self.dtype.itemsize:
            raise UserError(f"{bin_path} has {size} bytes but its index expects "
                            f"{num_tokens * self.dtype.itemsize} ({num_tokens} tokens): truncated or from "
                            "another run; re-run `mtnlg preprocess`")
        if verify is True or (verify == "auto" and size <= VERIFY_BIN_MAX_BYTES):
            if _crc_file(bin_path) != bin_crc:
                raise UserError(f"{bin_path} does not match the checksum in {idx_path}; re-run `mtnlg preprocess`")
        self.offsets = np.frombuffer(raw, dtype=np.int64, offset=HEADER_SIZE)
        self.doc_lengths = np.diff(self.offsets)
        self.num_tokens, self.vocab_size, self.eod_id = int(num_tokens), int(vocab), int(eod)
        self.fingerprint, self.checksum = fingerprint, (bin_crc, body_crc)
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if num_tokens
                       else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i %= len(self)
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = self.offsets[doc] + offset
        end = self.offsets[doc + 1] if length is None else start + length
        return self.tokens[start:end]


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")
