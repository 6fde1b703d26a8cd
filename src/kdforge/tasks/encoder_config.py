"""Recipe sections of the text-encoder tasks (``embedding`` and ``ranking``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.data.table import SourceFields
from kdforge.recipe import Strict

Pooling = Literal["mean", "cls", "max"]


class EncoderStudent(Strict):
    """The student encoder: a pretrained compact model, or a subset of the teacher's layers."""

    kind: Literal["encoder"] = "encoder"
    model: str | None = Field(
        None,
        description="a pretrained compact encoder: sentence-transformers or transformers folder, hub id,"
        " package:NAME, or an ONNX BERT (it takes the teacher's tokenizer)",
    )
    layers: list[int] | None = Field(None, description="the teacher's layers to keep, e.g. [0, 2, 5]")
    num_layers: int | None = Field(None, ge=1, description="keep this many of the teacher's layers (chosen by select)")
    select: Literal["even", "importance", "angular"] = Field(
        "even",
        description="how num_layers are chosen: even (evenly spaced, first and last included), importance (the"
        " highest block influence, ShortGPT), angular (all but the span of least angular distance, Gromov et al.);"
        " scored on calibration_batches of training texts",
    )
    calibration_batches: int = Field(8, ge=1, description="batches of training texts the layers are scored on")
    pooling: Pooling = Field("mean", description="pooling of a model without a sentence-transformers config")
    normalize: bool = Field(True, description="L2-normalise the embeddings of such a model")

    @model_validator(mode="after")
    def _one_source(self) -> EncoderStudent:
        given = [name for name in ("model", "layers", "num_layers") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of student.model (a pretrained compact encoder), student.layers or"
                f" student.num_layers (a subset of the teacher's layers); got {', '.join(given) or 'none'}"
            )
        if self.select != "even" and self.num_layers is None:
            raise ValueError(f"select: {self.select} chooses student.num_layers; give num_layers")
        return self


class RetrievalTest(Strict):
    """Where teacher, student and baseline are evaluated: a BEIR-layout folder, and WikiQA."""

    beir: str = Field(
        "scifact",
        description="BEIR folder (corpus.jsonl, queries.jsonl, qrels/); relative"
        " paths are looked up in KDFORGE_DATA_DIR",
    )
    split: str = Field("test", description="the qrels file evaluated (qrels/SPLIT.tsv)")
    query_limit: int | None = Field(None, ge=1, description="evaluate the first N judged queries only")
    corpus_limit: int | None = Field(
        None, ge=1, description="search the judged documents of those queries plus the first N others only"
    )
    k: int = Field(100, ge=10, description="documents retrieved per query (Recall@k)")
    wikiqa: str | None = Field(None, description="a WikiQA folder: also MAP and MRR over each question's candidates")
    wikiqa_split: str = "test"
    wikiqa_limit: int | None = Field(None, ge=1, description="the first N WikiQA questions only")
    latency_queries: int = Field(20, ge=1, description="single queries timed for the latency figure")


class EncoderData(Strict):
    """What both encoder tasks share: token lengths and the evaluation."""

    max_length: int = Field(256, ge=8, description="tokens kept per text (documents)")
    test: RetrievalTest = Field(default_factory=RetrievalTest)

    def check_files(self) -> None:
        """The evaluation's and the training's BEIR files, and any table's files, exist (``kdforge validate``)."""
        from kdforge.data.beir import check_beir_files
        from kdforge.data.paths import resolve_data_path

        check_beir_files(self.test.beir, self.test.split, "data.test.beir")
        if self.test.wikiqa is not None:
            resolve_data_path(self.test.wikiqa, "data.test.wikiqa")
        if isinstance(self, SourceFields) and (self.source is not None or self.files is not None):
            SourceFields.check_files(self)
        elif getattr(self, "text_file", None) is not None:
            resolve_data_path(self.text_file, "data.text_file")  # type: ignore[attr-defined]
        elif getattr(self, "beir", None) is not None:
            check_beir_files(self.beir, self.train_split, "data.beir")  # type: ignore[attr-defined]


def _table_or_beir(section: Any, what: str) -> None:
    """Training data from source/files replaces the BEIR folder; naming both is a mistake."""
    table = section.source is not None or section.files is not None
    if table and "beir" in section.model_fields_set and section.beir is not None:
        raise ValueError(f"data: give either beir or source and files for the {what}, not both")


class EmbeddingData(EncoderData, SourceFields):
    """Unlabeled texts to distill on: a BEIR folder's documents and training queries, or your own file.

    From ``source``/``files``: the ``text`` column, or several (``columns: {text: [title, body]}``,
    joined with a space); ``streaming`` reads them from the table on demand instead of holding them.
    """

    beir: str | None = Field("scifact", description="BEIR folder whose texts are the training data")
    texts: list[Literal["corpus", "queries"]] = Field(
        default_factory=lambda: ["corpus", "queries"],
        description="which of the folder's texts: its documents, and the queries of train_split",
    )
    train_split: str = "train"
    text_file: str | None = Field(None, description="a .txt (one text per line) or .jsonl ('text') file instead")
    train_limit: int | None = Field(None, ge=1, description="the first N training texts only")
    columns: dict[str, str | list[str]] = Field(
        {}, description="which column holds each role: text, or several joined, e.g. {text: [title, abstract]}"
    )
    streaming: bool = Field(
        False, description="source/files: read each text from the table when it is used (memory stays flat)"
    )

    @model_validator(mode="after")
    def _some_texts(self) -> EmbeddingData:
        _table_or_beir(self, "training texts")
        if self.streaming and self.source is None and self.files is None:
            raise ValueError("data.streaming: reads texts from source/files only")
        if self.beir is None and self.text_file is None and self.source is None and self.files is None:
            raise ValueError("give data.beir, data.text_file, or data.source and data.files: the texts to distill on")
        return self


def _refuse_tasb_settings(data: Any) -> Any:
    """``data.sampler``, ``data.clusters`` and ``data.bins`` became the tasb_batches method: refused with its
    spelling (without the method, batches are random queries, a random pair each: the former ``sampler: random``)."""
    if isinstance(data, dict):
        for old in ("sampler", "clusters", "bins"):
            if old in data:
                raise ValueError(
                    f"data.{old} moved to the recipe's methods list; for TAS-B batches write methods:"
                    " [{name: tasb_batches, clusters: N, bins: 10}] (clusters and bins as data had them), for random"
                    f" batches list no such method, and remove data.{old}"
                )
    return data


class RankingData(EncoderData, SourceFields):
    """(query, positive, negatives) from a BEIR folder's training qrels, negatives mined with the teacher.

    Or from any table (``source``/``files``): ``query`` and ``positive`` columns, and hard negatives as
    a ``negative`` text or a ``negatives`` list, which come before the mined ones.

    Batches are random queries, a random pair each, unless the recipe lists the ``tasb_batches`` method.
    """

    beir: str = Field("scifact", description="BEIR folder with the training queries and qrels")
    train_split: str = "train"
    query_max_length: int = Field(64, ge=4, description="tokens kept per query")
    columns: dict[str, str | list[str]] = Field(
        {},
        description="which column holds each role: query, positive, and negative (a text) or negatives (a list),"
        " e.g. {query: anchor}",
    )
    negatives: int = Field(
        30, ge=1, description="negatives mined per query: the teacher's top documents that are not positives"
    )
    skip_top: int = Field(0, ge=0, description="skip the teacher's N best non-positives (unlabelled positives)")
    negatives_per_example: int = Field(1, ge=1, description="K: negatives scored with each (query, positive)")
    miner: str | None = Field(
        None, description="the bi-encoder that mines negatives (default: the teacher; needed for a cross-encoder)"
    )
    in_batch: bool = Field(
        False,
        description="score every query against all documents of its batch ([B, B(1+K)], its own first): TAS-B's"
        " in-batch negatives; needs a teacher that can score new pairs (online or served, not a cache)",
    )
    query_limit: int | None = Field(None, ge=1, description="the first N training queries only")
    corpus_limit: int | None = Field(
        None, ge=1, description="mine among the judged documents plus the first N others only (quick runs)"
    )

    _moved = model_validator(mode="before")(_refuse_tasb_settings)

    @model_validator(mode="after")
    def _enough_negatives(self) -> RankingData:
        _table_or_beir(self, "training pairs")
        if self.negatives_per_example > self.negatives:
            raise ValueError(
                f"negatives_per_example ({self.negatives_per_example}) exceeds the mined negatives"
                f" ({self.negatives}); raise data.negatives"
            )
        return self


class SparseStudent(Strict):
    """The document encoder of an inference-free sparse retriever (queries need no model)."""

    kind: Literal["sparse"] = "sparse"
    model: str = Field(
        description="a BERT-style model with a masked-LM head, or a bi-encoder without one (a head tied to its"
        " word embeddings is made), or a saved sparse encoder"
    )
    layers: list[int] | None = Field(None, description="keep only these of the model's layers, e.g. [0, 2, 5]")
    head_bias: float = Field(
        -5.0, description="starting bias of a newly made head (lower: fewer non-zero terms at step 0)"
    )
    query_weights: Literal["idf", "binary"] = Field(
        "idf",
        description="idf: a query token weighs its IDF on the corpus (IDF-aware matching, Geng et al.);"
        " binary: every query token weighs 1 (plain FLOPS, the ablation)",
    )


class BM25Config(Strict):
    """BM25 (bm25s) as a teacher (``teacher.model: bm25``) and in reports."""

    k1: float = Field(1.5, ge=0)
    b: float = Field(0.75, ge=0, le=1)
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    stemmer: str | None = Field("english", description="PyStemmer language, or null for none")
    stopwords: str | None = Field("en", description="bm25s stopword list, or null for none")


class SparseData(RankingData):
    """Ranking data for the sparse retriever: in-batch negatives on by default, and BM25's settings."""

    in_batch: bool = Field(
        True, description="score every query against all documents of its batch (Geng et al.'s in-batch negatives)"
    )
    bm25: BM25Config = Field(default_factory=BM25Config)


class VQStudent(Strict):
    """The learned index: IVF lists and product-quantised residuals (Distill-VQ)."""

    kind: Literal["ivfpq"] = "ivfpq"
    nlist: int = Field(64, ge=1, description="IVF lists (coarse centroids)")
    m: int = Field(48, ge=1, description="PQ sub-quantizers: bytes per document at 8 bits (must divide the dimension)")
    nbits: int = Field(8, ge=1, le=16, description="bits per sub-quantizer code")
    opq: bool = Field(False, description="learn an OPQ rotation first (faiss), kept fixed while training")
    nprobe: int = Field(8, ge=1, description="lists searched per query (the same for every model in the report)")
    init: Literal["faiss", "random"] = Field(
        "faiss", description="faiss: start from faiss's IVF-PQ trained for reconstruction; random: uniform codebooks"
    )
    ivf_lr_scale: float = Field(
        10.0, gt=0, description="the centroids' learning rate / the codebooks' (Distill-VQ: 1e-3 vs 1e-4)"
    )


class VQData(EncoderData):
    """Training queries (no labels needed) against the test collection, which the index holds."""

    beir: str = Field("scifact", description="BEIR folder whose training queries are used (their texts only)")
    train_split: str = Field("train", description="the queries judged in qrels/SPLIT.tsv (no judgement is used)")
    query_max_length: int = Field(64, ge=4, description="tokens kept per query")
    top_k: int = Field(100, ge=1, description="each query's candidates: the teacher's top K documents")
    document_queries: int = Field(
        0, ge=0, description="also use N documents (their own embeddings) as training queries"
    )
    query_limit: int | None = Field(None, ge=1, description="the first N training queries only")
