import re,sys
d=sys.argv[1]
ev=[];
for l in open(d+'/c-ping.txt'):
    m=re.match(r'\[(\d+\.\d+)\] (.*)',l)
    if not m: continue
    s=re.search(r'icmp_seq=(\d+)',m.group(2)); ev.append((float(m.group(1)),'bytes from' in m.group(2),int(s.group(1))))
ans={s for t,ok,s in ev if ok}; sent=sorted({s for t,ok,s in ev})
lost=[s for s in range(sent[0],sent[-1]+1) if s not in ans]
E=[(float(l.split()[0]),l.split(None,1)[1].strip()) for l in open(d+'/events.txt')]
t0=E[0][0]
for t,e in E: print('%+8.1f ms  event %s'%((t-t0)*1000,e))
for l in open(d+'/c-fdb-monitor.txt'):
    p=l.split(None,1)
    if 'aa:bb:01' in p[1]: print('%+8.1f ms  C fdb: %s'%((float(p[0])-t0)*1000,p[1].strip()))
if lost:
    lb=max(t for t,ok,s in ev if ok and s<lost[0]); fa=min(t for t,ok,s in ev if ok and s>lost[-1])
    print('lost %d pings (seq %d..%d); last reply %+.1f ms, first reply after gap %+.1f ms'%(len(lost),lost[0],lost[-1],(lb-t0)*1000,(fa-t0)*1000))
else: print('no ping lost')
