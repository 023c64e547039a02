"""Self-contained HTML pages of search and evaluation results, for people to look at.

The last step of the data flow: it reads search results (`retrieval`) and
evaluation results (`evaluation`) and is imported by the commands only, so
neither of those packages depends on it. No TensorFlow.
"""
