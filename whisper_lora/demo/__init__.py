"""The offline demo corpus: real sentences, spoken by espeak-ng, in Common Voice layout."""
