import json
import warnings

import faiss
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kdforge.models.ivfpq import IVFPQSpec, IVFPQStudent, build_faiss_index, index_bytes

N_DOCS, DIM, NLIST, M, NBITS = 2000, 32, 8, 8, 4


def clustered(n=N_DOCS, dim=DIM, clusters=20, seed=0) -> np.ndarray:
    """Unit rows around ``clusters`` Gaussian centres, like a cosine teacher's document embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def noisy_queries(docs: torch.Tensor, n: int, seed: int, noise=0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(docs), (n,), generator=g)
    q = docs[rows] + noise * torch.randn(n, docs.shape[1], generator=g)
    return q / q.norm(dim=1, keepdim=True)


def listnet(student: torch.Tensor, teacher: torch.Tensor, tau=0.05) -> torch.Tensor:
    return -(torch.softmax(teacher / tau, -1) * torch.log_softmax(student / tau, -1)).sum(-1).mean()


def faiss_reconstruction(index: faiss.Index) -> np.ndarray:
    """faiss's own decoding of every stored document (list centroid + decoded residual), in the rotated space."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.make_direct_map()
    return ivf.reconstruct_n(0, ivf.ntotal)


@pytest.fixture(scope="module")
def docs() -> np.ndarray:
    return clustered()


@pytest.fixture(scope="module", params=[False, True], ids=["ivfpq", "opq"])
def built(request, docs):
    spec = IVFPQSpec(dim=DIM, nlist=NLIST, m=M, nbits=NBITS, opq=request.param)
    return spec, build_faiss_index(spec, docs, seed=0)


@pytest.fixture
def student(built, docs) -> IVFPQStudent:
    return IVFPQStudent.from_faiss(built[1], docs)


def all_rows() -> torch.Tensor:
    return torch.arange(N_DOCS)


def perturb(module: IVFPQStudent, seed=0, scale=0.02) -> None:
    """Move the parameters away from faiss's, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.centroids.add_(scale * torch.randn(module.centroids.shape, generator=g))
        module.codebooks.add_(scale * torch.randn(module.codebooks.shape, generator=g))


# ---------------------------------------------------------------- reading faiss's index


def test_from_faiss_reads_the_index(built, docs, student):
    spec, index = built
    assert student.spec == spec
    assert student.codebooks.shape == (M, 2**NBITS, DIM // M)
    assert student.centroids.shape == (NLIST, DIM)
    x = torch.from_numpy(docs)
    if spec.opq:
        opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
        np.testing.assert_allclose(student.rotate(x).numpy(), opq.apply(docs), atol=1e-5)
        eye = student.rotation @ student.rotation.T
        torch.testing.assert_close(eye, torch.eye(DIM), atol=1e-5, rtol=0)
    else:
        assert torch.equal(student.rotation, torch.eye(DIM))
    # the assignment is faiss's: the IVF quantizer's best list for each (rotated) document
    ivf = faiss.extract_index_ivf(index)
    _, lists = ivf.quantizer.search(student.rotate(x).numpy(), 1)
    assert torch.equal(student.assignment, torch.from_numpy(lists[:, 0]))
    assert torch.bincount(student.assignment, minlength=NLIST).min() > 0


# ---------------------------------------------------------------- forward = hard PQ, gradients flow


def test_forward_value_is_hard_pq(built, docs, student):
    x = torch.from_numpy(docs)
    reference = torch.from_numpy(faiss_reconstruction(built[1]))
    torch.testing.assert_close(student.reconstruct(x, all_rows()), reference, atol=1e-5, rtol=0)

    queries = noisy_queries(x, 16, seed=1)
    out = student(queries, x, all_rows())
    rotated = student.rotate(queries)
    torch.testing.assert_close(out["scores"], rotated @ reference.T, atol=1e-4, rtol=0)
    centres = student.centroids[student.assignment]
    torch.testing.assert_close(out["ivf_scores"], rotated @ centres.T, atol=1e-5, rtol=0)
    # the compressed score approximates the teacher's (the rotation is orthonormal, so <Rq, Rd> = <q, d>)
    assert (out["scores"] - queries @ x.T).abs().mean() < 0.1


def test_forward_on_a_subset_of_documents(student, docs):
    x = torch.from_numpy(docs)
    subset = torch.tensor([5, 1999, 0, 731])
    queries = noisy_queries(x, 4, seed=2)
    full = student(queries, x, all_rows())["scores"]
    part = student(queries, x[subset], subset)["scores"]
    torch.testing.assert_close(part, full[:, subset])
    assert student.codes(x[subset], subset).shape == (4, M)


def test_gradients_reach_codebooks_and_centroids(student, docs):
    x = torch.from_numpy(docs)
    rows = torch.arange(0, N_DOCS, 4)
    queries = noisy_queries(x, 16, seed=3)
    out = student(queries, x[rows], rows)
    teacher = queries @ x[rows].T
    (listnet(out["scores"], teacher) + listnet(out["ivf_scores"], teacher)).backward()
    for grad in (student.codebooks.grad, student.centroids.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert student.rotation.grad is None  # a buffer: fixed


def test_codebook_gradient_also_flows_through_the_soft_assignment(student, docs):
    """Beyond the chosen codewords: the softmax's straight-through path reaches codewords no document picks."""
    x = torch.from_numpy(docs)
    rows = torch.arange(0, 3)  # at most 3 of the 16 codewords of each sub-quantizer are picked
    chosen = torch.zeros(M, 2**NBITS, dtype=torch.bool)
    codes = student.codes(x[rows], rows)
    chosen[torch.arange(M).expand_as(codes), codes] = True
    assert not chosen.all()
    student(noisy_queries(x, 8, seed=4), x[rows], rows)["scores"].sum().backward()
    unchosen = student.codebooks.grad[~chosen]
    assert unchosen.abs().sum() > 0


# ---------------------------------------------------------------- export


def top10_agrees(index: faiss.Index, module: IVFPQStudent, docs: np.ndarray, queries: torch.Tensor) -> None:
    """The exported index's top 10 are the module's: same scores, and each returned id has its module score."""
    faiss.extract_index_ivf(index).nprobe = NLIST
    found_scores, found_ids = index.search(queries.numpy(), 10)
    assert (found_ids >= 0).all()
    with torch.no_grad():
        scores = module(queries, torch.from_numpy(docs), all_rows())["scores"]
    top = scores.topk(10)
    np.testing.assert_allclose(found_scores, top.values.numpy(), atol=1e-4)
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores.numpy(), found_ids, 1), atol=1e-4)
    # ids whose score clearly beats the 10th must be returned (equal scores may come back in any order)
    clear = scores > top.values[:, -1:] + 1e-4
    for row in range(len(queries)):
        assert set(torch.nonzero(clear[row]).flatten().tolist()) <= set(found_ids[row].tolist())


def test_export_round_trip_scores_as_the_module(student, docs, tmp_path):
    perturb(student)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # faiss must encode every residual with the module's codeword
        index = student.to_faiss(docs)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == 1 and ivf.ntotal == N_DOCS and faiss.downcast_index(ivf).by_residual
    assert isinstance(index, faiss.IndexPreTransform) == student.spec.opq
    faiss.write_index(index, str(tmp_path / "student.faiss"))
    loaded = faiss.read_index(str(tmp_path / "student.faiss"))

    queries = noisy_queries(torch.from_numpy(docs), 32, seed=5)
    top10_agrees(loaded, student, docs, queries)
    # faiss's decoding of the exported codes is the module's reconstruction
    x = torch.from_numpy(docs)
    expected = student.reconstruct(x, all_rows()).numpy()
    np.testing.assert_allclose(faiss_reconstruction(loaded), expected, atol=1e-5)
    # and reading it back gives the same module
    again = IVFPQStudent.from_faiss(loaded, docs)
    for name, value in student.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_untrained_export_equals_the_original_index(built, docs, student):
    _, original = built
    exported = student.to_faiss(docs)
    np.testing.assert_allclose(faiss_reconstruction(exported), faiss_reconstruction(original), atol=1e-6)
    queries = noisy_queries(torch.from_numpy(docs), 32, seed=6).numpy()
    for index in (original, exported):
        faiss.extract_index_ivf(index).nprobe = NLIST
    want_scores, want_ids = original.search(queries, 10)
    got_scores, got_ids = exported.search(queries, 10)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert (got_ids == want_ids).mean() > 0.95  # equal scores may be returned in another order
    assert index_bytes(exported) < docs.nbytes / 4


def test_export_rejects_another_collection(student, docs):
    with pytest.raises(ValueError, match="rows"):
        student.to_faiss(docs[:100])


# ---------------------------------------------------------------- training and state


def test_listnet_training_lowers_the_loss(student, docs):
    x = torch.from_numpy(docs)
    rows = all_rows()
    eval_queries = noisy_queries(x, 64, seed=7)
    eval_teacher = eval_queries @ x.T

    def eval_loss() -> float:
        with torch.no_grad():
            return listnet(student(eval_queries, x, rows)["scores"], eval_teacher).item()

    before = eval_loss()
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-3)
    for step in range(50):
        queries = noisy_queries(x, 32, seed=100 + step)
        out = student(queries, x, rows)
        teacher = queries @ x.T
        loss = listnet(out["scores"], teacher) + listnet(out["ivf_scores"], teacher)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = eval_loss()
    # the teacher's own entropy is the floor; 50 small steps close a real part (about 12%) of the gap to it
    floor = listnet(eval_teacher, eval_teacher).item()
    assert before - after > 0.05 * (before - floor), (floor, before, after)


def test_state_round_trip_through_safetensors(student, docs, tmp_path):
    perturb(student, seed=1)
    save_file(student.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(student.config()))
    config = json.loads((tmp_path / "config.json").read_text())
    loaded = IVFPQStudent.from_state(config, load_file(str(tmp_path / "model.safetensors")))
    assert loaded.spec == student.spec
    x = torch.from_numpy(docs)
    queries = noisy_queries(x, 8, seed=8)
    with torch.no_grad():
        want, got = student(queries, x, all_rows()), loaded(queries, x, all_rows())
    assert torch.equal(want["scores"], got["scores"]) and torch.equal(want["ivf_scores"], got["ivf_scores"])


def test_from_random_starts_and_exports(docs):
    spec = IVFPQSpec(dim=DIM, nlist=NLIST, m=M, nbits=NBITS)
    module = IVFPQStudent.from_random(spec, docs, seed=0)
    assert module.codebooks.abs().max() <= 0.1
    assert torch.bincount(module.assignment, minlength=NLIST).min() > 0
    queries = noisy_queries(torch.from_numpy(docs), 8, seed=9)
    top10_agrees(module.to_faiss(docs), module, docs, queries)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 30, "m": 8}, "divisible"),
        ({"nbits": 0}, "nbits"),
        ({"nbits": 17}, "nbits"),
        ({"nlist": 0}, "nlist"),
        ({"metric": "l2"}, "metric"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IVFPQSpec(**{"dim": DIM, "nlist": NLIST, "m": M, "nbits": NBITS, **kwargs})


@pytest.mark.parametrize(("n", "nlist", "nbits"), [(12, 16, 2), (100, 4, 8)])
def test_too_few_documents_names_the_fix(n, nlist, nbits):
    spec = IVFPQSpec(dim=DIM, nlist=nlist, m=M, nbits=nbits)
    with pytest.raises(ValueError, match=r"lower student\.nlist / student\.nbits"):
        build_faiss_index(spec, clustered(n=n), seed=0)


def test_few_documents_still_build():
    """Below faiss's 39 points per centroid it only warns."""
    spec = IVFPQSpec(dim=DIM, nlist=4, m=M, nbits=4)
    docs = clustered(n=60)
    with pytest.warns(UserWarning, match="under-trained"):
        module = IVFPQStudent.from_faiss(build_faiss_index(spec, docs, seed=0), docs)
    assert module.assignment.shape == (60,)


def test_opq_needs_256_documents_for_its_own_pq():
    spec = IVFPQSpec(dim=DIM, nlist=4, m=M, nbits=4, opq=True)
    with pytest.raises(ValueError, match="student.opq"):
        build_faiss_index(spec, clustered(n=60), seed=0)


def test_build_is_seeded(docs):
    spec = IVFPQSpec(dim=DIM, nlist=NLIST, m=M, nbits=NBITS)
    first, second = (build_faiss_index(spec, docs, seed=3) for _ in range(2))
    assert np.array_equal(faiss.serialize_index(first), faiss.serialize_index(second))
