"""The recipe of the shipped knee-joint finder (weights/finder.pt, v1.2.0): ``python -m train.fit_finder --recipe``.

These are the arguments its last fit received (the file's ``trained`` record). The finder is a chain of
fine-tunes: v1.0.0 was trained from ImageNet with the parser's defaults (`make finder`), v1.1.0 was v1.0.0
fine-tuned with the hard views below, and v1.2.0 was v1.1.0 fine-tuned with the same views plus the fit half
of the non-knee radiographs (docs/FILMS.md). Flags given on the command line override any line here.
"""

init = "weights/finder.pt"  # fine-tune the finder shipped before (v1.1.0 then), not ImageNet's layers alone
epochs = 8  # a short fine-tune: the detection head already works, only the hard kinds are new
lr = 5e-4  # a quarter of the from-scratch rate (2e-3), to move the fine-tuned head gently
film_copies = 8  # random views of each training film
rare_copies = 8  # extra views of each film whose note names a rare kind (children, hardware, edges: #21)
crops = 300  # dataset crops, so that a joint crop is still recognised as a crop
metal = 0.3  # share of film views with synthetic plates, screws and staples (v1.0.0 missed a plated knee)
edge = 0.25  # share of film views framed with a joint at the window's edge (v1.0.0 missed a knee cut by the edge)
faint = 0.15  # share of film views washed out
seed = 0
nonknee = "../shared/data/nonknee"  # views of its fit half are negatives (nonknee_split); the other half is held out
nonknee_copies = 8  # random views of each fit-half non-knee radiograph
version = "1.2.0"  # the finder version written into the file
