"""Adapters for LangChain and LlamaIndex, thin faces over one framework-free core.

:mod:`~compressor_plugin.integrations.core` holds what both share (options, splitting,
compression, metadata) and imports neither framework; ``langchain`` and ``llama_index``
import only their own framework.
"""
