"""Offline data: corpora, tokenizers, labelled text, fact tables and images; each loader names the package to
install when its data is missing (``leanfit data status``)."""

from leanfit.studies.data.corpora import Corpus, Document, load_corpus, split_documents
from leanfit.studies.data.facts import countries, elements, trivia
from leanfit.studies.data.images import digits, mnist5k
from leanfit.studies.data.labelled import LabelledText, bbc_news, rotten_tomatoes
from leanfit.studies.data.tokenizer import bpe_tokenizer, to_hf_tokenizer, train_bpe

__all__ = [
    "Corpus",
    "Document",
    "LabelledText",
    "bbc_news",
    "bpe_tokenizer",
    "countries",
    "digits",
    "elements",
    "load_corpus",
    "mnist5k",
    "rotten_tomatoes",
    "split_documents",
    "to_hf_tokenizer",
    "train_bpe",
    "trivia",
]
