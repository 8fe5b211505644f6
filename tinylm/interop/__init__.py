"""Models and tokenizers to and from other programs' formats (Hugging Face folders)."""
