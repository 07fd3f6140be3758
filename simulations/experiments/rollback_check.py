# docs/results.md §9: python3 simulations/experiments/rollback_check.py results/rollback-byzantine/..  (the folder above the cells)
import csv, glob, json, os, sys, collections
root = sys.argv[1]
# Tolerance per variant, read from its label ("...-rollback-0.05"); variants
# without one (measure only) are checked against the second argument.
default_tol = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
rows_out = collections.defaultdict(list)
for d in sorted(glob.glob(os.path.join(root, '*', 'seed=*'))):
    cell = os.path.basename(d)
    variant = cell.split('variant=')[1]
    seed = cell.split(',')[0].split('=')[1]
    tol = float(variant.rsplit('-', 1)[1]) if '-rollback-' in variant else default_tol
    s = json.load(open(os.path.join(d, 'summary.json')))
    rows = list(csv.DictReader(open(os.path.join(d, 'metrics.csv'))))
    honest = [r for r in rows if r['byzantine'] == '0']
    by_node = collections.defaultdict(list)
    for r in honest:
        by_node[r['node']].append(r)
    below = 0; checks = 0; worst = 0.0; rb_honest = 0
    for node, rs in by_node.items():
        rs.sort(key=lambda r: int(r['round']))
        best = None
        for r in rs:
            v = float(r['validation_accuracy'])
            rb_honest += int(r['rolled_back'])
            if best is not None:
                checks += 1
                if v < best - tol - 1e-9:
                    below += 1
                worst = max(worst, best - v)
            best = v if best is None else max(best, v)
    rows_out[variant].append((seed, s['final_mean_accuracy'], below, checks, worst, rb_honest, s.get('rollbacks_per_round')))
for v, rs in rows_out.items():
    accs = [r[1] for r in rs]
    m = sum(accs)/len(accs)
    sd = (sum((a-m)**2 for a in accs)/(len(accs)-1))**0.5 if len(accs) > 1 else 0
    print(f"| {v} | {' / '.join(f'{r[1]:.4f}' for r in rs)} | {m:.4f} ± {sd:.4f} | {sum(r[2] for r in rs)} / {sum(r[3] for r in rs)} | {max(r[4] for r in rs):.4f} | {sum(r[5] for r in rs)} | {'; '.join(str(r[6]) for r in rs)} |")
