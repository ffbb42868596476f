"""The math and the ComfyUI patching behind the nodes (no node code here).

``balance`` depends on torch only; the other modules use ComfyUI's runtime.
"""
