"""KOA-Serve's DICOM gateway: a PACS sends knee radiographs, the gateway returns a Structured Report and a heatmap.

A pynetdicom storage SCP (AE ``KOASERVE``) writes each received instance to a spool on disk before it
acknowledges the C-STORE, grades it on a running KOA-Serve over REST (`koa_client.RestClient`, like any
other client: the gateway never imports the model code and can run on another machine), and stores
the results back into the same study by C-STORE: a TID 1500 Structured Report built with highdicom
(UNVERIFIED until a reader signs it) and a Secondary Capture of the heatmap overlay. Every step is
recorded in an append-only audit log (JSON lines). docs/PACS.md describes the flow and its limits.

    python -m gateway serve --spool logs/pacs/spool --ts-url http://127.0.0.1:8080 \\
        --key-file logs/serve/key_file.json --pacs ORTHANC@127.0.0.1:4242
"""
