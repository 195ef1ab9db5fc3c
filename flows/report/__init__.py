"""The run report a curator opens (``<out>/runs/<run_id>/report.html``), built from storage alone.

``flows.report.build`` holds the entry points (``build_report``, ``report_markdown``, ``latest_run``,
``page_uri``); the modules under it do the work, each importing only those before it: ``cards`` (summary rows
grouped into cards, in report order), ``thumbs`` (thumbnails and storage look-ups), ``curves`` (the SVG loss
curves), ``html`` (a card's HTML) and ``page`` (a page around the cards: header, filters, page links, CSS and JS).
"""
