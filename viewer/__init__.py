"""The read-only web viewer over a state repo and its storage (`winslow viewer`).

`source.py` keeps the viewer's own mirror fresh and reads it through `RepoView`;
`overview.py` and `pages.py` turn the model into what each page shows; `app.py`
serves it as HTML and, under /api/, as JSON; `livelog.py` streams a running log;
`files.py` reads storage, local or over SSH, through `reconciler.storage.Storage`;
`charts.py` and `nodecharts.py` draw SVG; `security.py` guards every request.
"""
