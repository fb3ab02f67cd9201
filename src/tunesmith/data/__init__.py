"""Data: read records, render formats and templates, tokenise with loss masks, pack and batch."""
