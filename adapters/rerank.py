"""Reranking (/v1/rerank, /rerank): Jina/Cohere's body (query, documents, top_n) scored by the --rerankmodel GGUF
with rank pooling; results sorted by relevance, best first."""
from __future__ import annotations

from typing import List

from . import fields as F
from .chat import Context, new_id
from .errors import ApiError, BadRequest

MAX_DOCUMENTS = 1024


def _bad(msg: str, param: str) -> BadRequest:
    return BadRequest(msg, param=param)


def parse(body) -> tuple:
    """-> (query, documents, top_n or None, return_documents)."""
    b = F.Body(body)
    query = b.raw("query")
    if not isinstance(query, str) or not query:
        raise _bad("'query' must be a non-empty string", "query")
    docs = b.raw("documents", "texts")
    if not isinstance(docs, list) or not docs or len(docs) > MAX_DOCUMENTS:
        raise _bad(f"'documents' must be an array of 1 to {MAX_DOCUMENTS} strings (or {{\"text\": ...}} objects)",
                   "documents")
    texts: List[str] = []
    for i, d in enumerate(docs):
        if isinstance(d, dict):
            d = d.get("text")
        if not isinstance(d, str):
            raise _bad(f"documents[{i}] must be a string or an object with a string 'text'", "documents")
        texts.append(F.clean_text(d))
    top_n = b.int("top_n", None, 1, None)
    return F.clean_text(query), texts, top_n, b.bool("return_documents")


def run(body, ctx: Context) -> dict:
    eng = ctx.engine
    if not getattr(eng, "rerank_model_name", None):
        raise ApiError("reranking needs a reranker model: start the server with --rerankmodel FILE.gguf (e.g. "
                       "bge-reranker-v2-m3 or Qwen3-Reranker)", 501, "not_implemented")
    query, docs, top_n, with_docs = parse(body)
    try:
        scores, n_tok = eng.rerank(query, docs)
    except RuntimeError as e:
        raise ApiError(f"reranking failed: {e}", 500, "server_error")
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n or len(docs)]
    results = []
    for i in order:
        r = {"index": i, "relevance_score": scores[i]}
        if with_docs:
            r["document"] = {"text": docs[i]}
        results.append(r)
    return {"id": new_id("rerank-"), "object": "list", "model": eng.rerank_model_name, "results": results,
            "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}
