"""A learnable IVF-PQ index: the student of Distill-VQ (Xiao et al., SIGIR 2022).

Distill-VQ compresses a dense retriever's document embeddings into an IVF-PQ index and then *learns the index*:
the document embeddings ``v_d`` stay fixed (they are the teacher's), while the IVF centroids and the PQ codebooks
are trained by gradient descent so that scores computed through the quantised documents reproduce the teacher's
ranking (a ListNet loss between ``<v_q, v_d>`` and the student's scores). Reconstruction-trained indexes (plain
k-means) minimise ``||v - v_hat||``, which is not the same thing as keeping the order of the top documents.

This module is the index as an ``nn.Module`` plus the faiss glue around it:

- :func:`build_faiss_index` trains faiss's own IVF-PQ (optionally with OPQ) for reconstruction: the starting point.
- :class:`IVFPQStudent` reads that index's parameters (:meth:`IVFPQStudent.from_faiss`), scores queries against
  quantised documents differentiably (a straight-through estimator whose forward value *is* hard PQ), and exports
  the learned parameters back into a faiss index (:meth:`IVFPQStudent.to_faiss`) that scores exactly as the module.
- :func:`index_bytes` measures an index's serialised size, for reporting the compression.

Only inner-product scoring is supported: cosine teachers produce unit rows, so the inner product is what is ranked.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from faiss.contrib.ivf_tools import add_preassigned
from torch import nn

METRICS = ("ip",)


@dataclass
class IVFPQSpec:
    """The shape of an IVF-PQ index: ``nlist`` coarse lists, residuals split into ``m`` sub-vectors of ``nbits``."""

    dim: int
    nlist: int
    m: int
    nbits: int = 8
    opq: bool = False
    metric: str = "ip"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"IVF-PQ metric must be one of {METRICS}, got {self.metric!r}")
        if self.dim < 1 or self.m < 1:
            raise ValueError(f"IVF-PQ needs dim >= 1 and m >= 1, got dim={self.dim}, m={self.m}")
        if self.dim % self.m != 0:
            raise ValueError(
                f"IVF-PQ splits each vector into m equal sub-vectors, so dim ({self.dim}) must be divisible by "
                f"m ({self.m}); pick an m that divides {self.dim}"
            )
        if not 1 <= self.nbits <= 16:
            raise ValueError(f"IVF-PQ nbits must be in 1..16, got {self.nbits}")
        if self.nlist < 1:
            raise ValueError(f"IVF-PQ nlist must be >= 1, got {self.nlist}")

    @property
    def ksub(self) -> int:
        """Codewords per sub-quantizer."""
        return 2**self.nbits

    @property
    def dsub(self) -> int:
        """Dimension of each sub-vector."""
        return self.dim // self.m

    def factory_string(self) -> str:
        ivfpq = f"IVF{self.nlist},PQ{self.m}x{self.nbits}"
        return f"OPQ{self.m},{ivfpq}" if self.opq else ivfpq


# ---------------------------------------------------------------- building faiss's own (reconstruction) index


def _as_float32_rows(x: np.ndarray | torch.Tensor, dim: int, what: str) -> np.ndarray:
    """faiss wants C-contiguous float32 ``[n, dim]``; convert once here so every caller gets the same check."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must be a [N, {dim}] matrix, got shape {tuple(x.shape)}")
    return x


def _check_enough_points(spec: IVFPQSpec, n: int) -> None:
    # faiss only warns below 39 points per centroid, but k-means cannot make more centroids than it has points
    if spec.opq and n < 256:
        # faiss's OPQ learns its rotation with its own 8-bit PQ (256 codewords), whatever the index's nbits
        raise ValueError(
            f"OPQ trains its rotation with 256 codewords per sub-quantizer, more than the {n} documents;"
            " set student.opq: false or use more documents"
        )
    if n < spec.nlist or n < spec.ksub:
        raise ValueError(
            f"cannot train an IVF-PQ index with nlist={spec.nlist} lists and 2**nbits={spec.ksub} codewords on "
            f"only {n} documents (k-means needs at least as many points as centroids); "
            "lower student.nlist / student.nbits or use more documents"
        )


def build_faiss_index(spec: IVFPQSpec, doc_emb: np.ndarray, seed: int) -> faiss.Index:
    """Train faiss's IVF-PQ (with OPQ when ``spec.opq``) on ``doc_emb`` for reconstruction and add the documents.

    Document ``i`` gets faiss id ``i``. The k-means seeds are set so that the same inputs give the same index.
    """
    x = _as_float32_rows(doc_emb, spec.dim, "doc_emb")
    _check_enough_points(spec, len(x))
    index = faiss.index_factory(spec.dim, spec.factory_string(), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    wanted = 39 * max(spec.nlist, spec.ksub)  # faiss's own threshold (min_points_per_centroid = 39)
    if len(x) < wanted:
        # faiss would print its warning once per k-means (once per sub-quantizer): say it once, then let it train
        warnings.warn(
            f"IVF-PQ trained on {len(x)} documents; faiss advises at least {wanted} for {spec.nlist} lists and"
            f" {spec.ksub} codewords per sub-quantizer (codebooks may be under-trained)",
            stacklevel=2,
        )
        ivf.cp.min_points_per_centroid = 1
        ivf.pq.cp.min_points_per_centroid = 1
    index.train(x)
    index.add(x)
    return index


# ---------------------------------------------------------------- reading an index back


def _split_index(index: faiss.Index) -> tuple[np.ndarray | None, faiss.IndexIVFPQ]:
    """``(rotation or None, the IVF-PQ)`` of an ``IndexIVFPQ`` or an ``IndexPreTransform`` over one."""
    index = faiss.downcast_index(index)
    rotation = None
    if isinstance(index, faiss.IndexPreTransform):
        if index.chain.size() != 1:
            raise ValueError(f"expected one pre-transform (OPQ) before the IVF-PQ, found {index.chain.size()}")
        transform = faiss.downcast_VectorTransform(index.chain.at(0))
        if not isinstance(transform, faiss.LinearTransform) or transform.d_in != transform.d_out:
            raise ValueError(f"expected a square linear pre-transform (OPQ), found {type(transform).__name__}")
        if transform.have_bias:
            raise ValueError("a pre-transform with a bias is not a rotation; only OPQ-style transforms are supported")
        rotation = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexIVFPQ):
        raise ValueError(f"expected an IVF-PQ index (optionally behind OPQ), found {type(index).__name__}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("only inner-product IVF-PQ indexes are supported")
    if not index.by_residual:
        raise ValueError("the IVF-PQ must encode residuals to the list centroid (by_residual)")
    return rotation, index


def _list_assignment(ivf: faiss.IndexIVF, n_docs: int) -> np.ndarray:
    """Each document's IVF list, read from the inverted lists so it is exactly faiss's assignment."""
    if ivf.ntotal != n_docs:
        raise ValueError(f"the index holds {ivf.ntotal} vectors but doc_emb has {n_docs} rows")
    assignment = np.full(n_docs, -1, dtype=np.int64)
    invlists = ivf.invlists
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size == 0:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy()
        if ids.min() < 0 or ids.max() >= n_docs:
            raise ValueError("the index's ids must be the rows of doc_emb (0..N-1)")
        assignment[ids] = lst
    if (assignment < 0).any():
        raise ValueError("the index's ids must be the rows of doc_emb, each exactly once")
    return assignment


# ---------------------------------------------------------------- the learnable index


class IVFPQStudent(nn.Module):
    """An IVF-PQ index over a fixed document collection, with learnable centroids and codebooks.

    A document ``d`` (row ``i`` of the collection) lives in list ``c(d) = assignment[i]`` (fixed: learning moves the
    centroids, not the documents between lists). Its rotated residual ``u = R v_d - o_{c(d)}`` is split into ``m``
    sub-vectors, each replaced by a codeword. Scores are inner products with the rotated query ``R q``.
    """

    architecture = "ivfpq"

    def __init__(self, spec: IVFPQSpec, n_docs: int):
        super().__init__()
        self.spec = spec
        self.register_buffer("rotation", torch.eye(spec.dim))
        self.centroids = nn.Parameter(torch.zeros(spec.nlist, spec.dim))
        self.codebooks = nn.Parameter(torch.zeros(spec.m, spec.ksub, spec.dsub))
        self.register_buffer("assignment", torch.zeros(n_docs, dtype=torch.int64))
        #: the centroids' learning rate over the codebooks' (Distill-VQ: IVF 1e-3, PQ 1e-4)
        self.ivf_lr_scale = 1.0

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups (kdforge's engine asks the model): codebooks at the recipe's learning rate,
        centroids at ``ivf_lr_scale`` times it."""
        return [{"params": [self.codebooks]}, {"params": [self.centroids], "lr_scale": self.ivf_lr_scale}]

    # ------------------------------------------------------------ construction and state

    @classmethod
    def from_faiss(cls, index: faiss.Index, doc_emb: np.ndarray | torch.Tensor) -> IVFPQStudent:
        """Start from a trained faiss IVF-PQ (e.g. :func:`build_faiss_index`) over the rows of ``doc_emb``."""
        rotation, ivf = _split_index(index)
        pq = ivf.pq
        spec = IVFPQSpec(dim=ivf.d, nlist=ivf.nlist, m=pq.M, nbits=pq.nbits, opq=rotation is not None)
        x = _as_float32_rows(doc_emb, spec.dim, "doc_emb")
        module = cls(spec, len(x))
        with torch.no_grad():
            if rotation is not None:
                module.rotation.copy_(torch.from_numpy(np.ascontiguousarray(rotation, dtype=np.float32)))
            module.centroids.copy_(torch.from_numpy(ivf.quantizer.reconstruct_n(0, spec.nlist)))
            codebooks = faiss.vector_to_array(pq.centroids).reshape(spec.m, spec.ksub, spec.dsub)
            module.codebooks.copy_(torch.from_numpy(codebooks))
            module.assignment.copy_(torch.from_numpy(_list_assignment(ivf, len(x))))
        return module

    @classmethod
    def from_random(cls, spec: IVFPQSpec, doc_emb: np.ndarray | torch.Tensor, seed: int) -> IVFPQStudent:
        """Start without a PQ: spherical k-means centroids, documents in their best list, small random codebooks.

        The rotation is the identity (``spec.opq`` then only means the export keeps a pre-transform).
        """
        x = _as_float32_rows(doc_emb, spec.dim, "doc_emb")
        _check_enough_points(spec, len(x))
        # spherical k-means + inner-product assignment, as faiss's IVF does for METRIC_INNER_PRODUCT
        kmeans = faiss.Kmeans(spec.dim, spec.nlist, niter=20, seed=seed, spherical=True)
        kmeans.train(x)
        _, lists = kmeans.index.search(x, 1)
        module = cls(spec, len(x))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            module.centroids.copy_(torch.from_numpy(kmeans.centroids))
            module.codebooks.copy_(torch.rand(module.codebooks.shape, generator=generator) * 0.2 - 0.1)
            module.assignment.copy_(torch.from_numpy(lists[:, 0].astype(np.int64)))
        return module

    def config(self) -> dict[str, Any]:
        """What, with the state dict, rebuilds this module (see :meth:`from_state`)."""
        return {**asdict(self.spec), "n_docs": int(self.assignment.shape[0])}

    @classmethod
    def from_state(cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> IVFPQStudent:
        spec_fields = {f.name for f in fields(IVFPQSpec)}
        spec = IVFPQSpec(**{k: v for k, v in config.items() if k in spec_fields})
        module = cls(spec, int(config["n_docs"]))
        module.load_state_dict(state_dict)
        return module

    # ------------------------------------------------------------ scoring

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` for each row (faiss's LinearTransform computes ``x A^T``)."""
        return x @ self.rotation.T

    def _residuals(self, doc_emb: torch.Tensor, doc_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(list centroid o_{c(d)} [U, D], residual sub-vectors u [U, m, dsub])``."""
        centre = self.centroids[self.assignment[doc_index]]
        residual = self.rotate(doc_emb) - centre
        return centre, residual.reshape(len(doc_emb), self.spec.m, self.spec.dsub)

    def _codeword_logits(self, residual: torch.Tensor) -> torch.Tensor:
        """``-||u_m - c_{m,k}||^2`` up to a per-(document, sub-vector) constant, ``[U, m, ksub]``.

        The dropped ``||u_m||^2`` changes neither the softmax nor the argmax, and expanding the square avoids
        materialising a ``[U, m, ksub, dsub]`` difference tensor.
        """
        cross = torch.einsum("umd,mkd->umk", residual, self.codebooks)
        return 2 * cross - (self.codebooks**2).sum(-1)

    def _quantise(self, residual: torch.Tensor) -> torch.Tensor:
        """Straight-through PQ: the value is the nearest codeword, the gradient that of the soft assignment."""
        logits = self._codeword_logits(residual)
        soft = F.softmax(logits, dim=-1)
        # argmax of the logits, not of the softmax: rounding can make near-equal probabilities exactly equal
        hard = F.one_hot(logits.argmax(-1), self.spec.ksub).to(soft.dtype)
        weights = hard + soft - soft.detach()
        quantised = torch.einsum("umk,mkd->umd", weights, self.codebooks)
        return quantised.reshape(len(residual), self.spec.dim)

    def forward(
        self, query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Score ``[B, D]`` queries against ``[U, D]`` documents (collection rows ``doc_index`` ``[U]``).

        Returns ``scores`` ``<R q, o_{c(d)} + u_hat_d>`` (the IVF-PQ score; forward value = hard PQ) and
        ``ivf_scores`` ``<R q, o_{c(d)}>`` (the coarse score Distill-VQ trains with its own term), both ``[B, U]``.
        """
        centre, residual = self._residuals(doc_emb, doc_index)
        query = self.rotate(query_emb)
        return {"scores": query @ (centre + self._quantise(residual)).T, "ivf_scores": query @ centre.T}

    @torch.no_grad()
    def codes(self, doc_emb: torch.Tensor, doc_index: torch.Tensor) -> torch.Tensor:
        """Each document's codeword per sub-quantizer, ``[U, m]`` int64."""
        _, residual = self._residuals(doc_emb, doc_index)
        return self._codeword_logits(residual).argmax(-1)

    @torch.no_grad()
    def reconstruct(self, doc_emb: torch.Tensor, doc_index: torch.Tensor) -> torch.Tensor:
        """The hard-quantised documents in the rotated space, ``o_{c(d)} + u_hat_d``, ``[U, D]``."""
        centre, residual = self._residuals(doc_emb, doc_index)
        return centre + self._quantise(residual)

    # ------------------------------------------------------------ export

    @torch.no_grad()
    def to_faiss(self, doc_emb: np.ndarray | torch.Tensor) -> faiss.Index:
        """A faiss index holding the learned centroids and codebooks, with the collection's rows as ids.

        Documents keep their fixed lists; faiss encodes each residual by its nearest codeword in L2, which is the
        module's argmax, so the index scores as :meth:`forward` does. With OPQ the rotation is a pre-transform, so
        search with raw query embeddings. ``nprobe`` is left at 1: set ``faiss.extract_index_ivf(index).nprobe``.
        """
        spec = self.spec
        x = _as_float32_rows(doc_emb, spec.dim, "doc_emb")
        if len(x) != len(self.assignment):
            raise ValueError(f"doc_emb has {len(x)} rows but the index was built over {len(self.assignment)}")
        ivf = self._empty_faiss_ivf()
        rows = torch.arange(len(x), device=self.assignment.device)
        docs = torch.from_numpy(x).to(self.rotation.device)
        rotated = np.ascontiguousarray(self.rotate(docs).cpu().numpy(), dtype=np.float32)
        add_preassigned(ivf, rotated, np.ascontiguousarray(self.assignment.cpu().numpy(), dtype=np.int64))
        self._warn_if_codes_differ(ivf, docs, rows)
        if not spec.opq:
            return ivf
        transform = faiss.LinearTransform(spec.dim, spec.dim, False)
        faiss.copy_array_to_vector(self.rotation.detach().cpu().numpy().astype(np.float32).ravel(), transform.A)
        transform.is_trained = True
        return faiss.IndexPreTransform(transform, ivf)

    def _empty_faiss_ivf(self) -> faiss.IndexIVFPQ:
        spec = self.spec
        quantizer = faiss.IndexFlatIP(spec.dim)
        quantizer.add(np.ascontiguousarray(self.centroids.detach().cpu().numpy(), dtype=np.float32))
        ivf = faiss.IndexIVFPQ(quantizer, spec.dim, spec.nlist, spec.m, spec.nbits, faiss.METRIC_INNER_PRODUCT)
        # the IVF frees its quantizer; Python must not free it a second time
        ivf.own_fields = True
        quantizer.this.disown()
        codebooks = np.ascontiguousarray(self.codebooks.detach().cpu().numpy(), dtype=np.float32)
        faiss.copy_array_to_vector(codebooks.ravel(), ivf.pq.centroids)
        ivf.is_trained = True
        if not ivf.by_residual:  # the scores decompose as <q, o> + <q, u_hat> only for residual encoding
            raise RuntimeError("faiss built an IVF-PQ that does not encode residuals")
        return ivf

    def _warn_if_codes_differ(self, ivf: faiss.IndexIVFPQ, docs: torch.Tensor, rows: torch.Tensor) -> None:
        """faiss re-encodes the residuals itself; check it chose the module's codewords (up to exact ties)."""
        _, residual = self._residuals(docs, rows)
        ours = self._quantise(residual).cpu().numpy()
        flat = np.ascontiguousarray(residual.reshape(len(docs), -1).cpu().numpy(), dtype=np.float32)
        theirs = ivf.pq.decode(ivf.pq.compute_codes(flat))
        differing = int((np.abs(ours - theirs).max(axis=1) > 1e-6).sum())
        if differing:
            warnings.warn(
                f"faiss encoded {differing} of {len(docs)} documents with other codewords than the module "
                "(near-ties in distance); their exported scores differ slightly",
                stacklevel=3,
            )


def index_bytes(index: faiss.Index) -> int:
    """Size of the serialised index in bytes (codes, ids, centroids, codebooks and any rotation)."""
    return int(faiss.serialize_index(index).nbytes)
