"""Rephrasing: curated documents rewritten by an LLM (or the extractive heuristic) into new formats."""
