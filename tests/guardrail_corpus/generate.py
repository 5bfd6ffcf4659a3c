#!/usr/bin/env python3
"""Writes the labelled guardrail corpus (pii.txt, secrets.txt) from fixed seeds.

Each line: LABEL<TAB>TEXT. LABEL is the match kind the line must yield (email, card, openai, ...)
or '-' for a line that must yield nothing. '\\n' in TEXT stands for a line break. Values that
need a checksum (cards, IBANs) or a format (keys, JWTs) are computed here, so positives are
valid and look-alikes are invalid in exactly the way a real one would not be. The injection
corpus (prompt_injection.txt) is written by hand.
"""
import base64, json, random, string

rng = random.Random(20240611)

def luhn_digit(body):
    total = 0
    for i, d in enumerate(reversed(body)):
        d = int(d)
        if i % 2 == 0:
            d *= 2
            if d > 9: d -= 9
        total += d
    return str((10 - total % 10) % 10)

def card(prefix, length):
    body = prefix + ''.join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)

def bad_luhn(number):
    last = int(number[-1])
    return number[:-1] + str((last + rng.randint(1, 9)) % 10)

def group(number, sizes, sep):
    out, at = [], 0
    for s in sizes:
        out.append(number[at:at + s]); at += s
    return sep.join(out)

def iban(country, bban):
    digits = ''.join(str(int(c, 36)) for c in bban + country + '00')
    check = 98 - int(digits) % 97
    return f"{country}{check:02d}{bban}"

def spaced(s):
    return ' '.join(s[i:i + 4] for i in range(0, len(s), 4))

def rand(alphabet, n):
    return ''.join(rng.choice(alphabet) for _ in range(n))

ALNUM = string.ascii_letters + string.digits
B32 = string.ascii_uppercase + '234567'

def b64url(obj):
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(',', ':')).encode()).decode().rstrip('=')

pii = []
P = lambda kind, text: pii.append((kind, text))
N = lambda text: pii.append(('-', text))

# --- e-mail -------------------------------------------------------------------------------
first = ['anna', 'john.smith', 'm.garcia', 'li.wei', 'o.connor', 'sam_lee', 'r2d2', 'jane.doe+billing', 'HR-team', 'priya.k']
domains = ['example.com', 'acme-corp.io', 'mail.example.org', 'uni-heidelberg.de', 'company.co.uk', 'startup.ai', 'gov.example.net', 'EXAMPLE.COM', 'post.example.fr', 'shop.example.com.au']
email_templates = ['Please contact {} for the invoice.', 'cc: {}', 'Send the report to {} by Friday', 'My address is {}.', 'mailto:{}', 'From: "Anna" <{}>', 'reach out at {}, thanks', 'Forwarded by {} on Monday', '{} wrote: the numbers look off', 'email me ({}) if anything breaks']
for i in range(25):
    P('email', rng.choice(email_templates).format(f"{rng.choice(first)}@{rng.choice(domains)}"))
for text in ['user@localhost is the default account', 'mention @channel and @here in Slack', 'the decorator @Override goes above the method',
             'CSS: @media (max-width: 600px) { body { margin: 0 } }', 'assets: logo@2x.png, logo@3x.png', 'git clone git@github.com:acme/widgets.git',
             'npm install lodash@4.17.21', 'pip install requests==2.31.0 and pkg@1.0.0', 'the pattern foo@bar has no domain', 'a@b.c is not a real address',
             'write support at example dot com', 'docker pull nginx@sha256:abc123', 'ping me @jane.doe on Twitter', 'scope @babel/core@7.22.0 resolved',
             'the matrix A@B is a product in some notations', 'price: 3 @ 4.99 each', 'user@host:~$ ls -la', 'the column email_address is empty']:
    N(text)

# --- phone --------------------------------------------------------------------------------
phones = ['+1 415 555 2671', '+1-415-555-2671', '(415) 555-2671', '415.555.2671', '415-555-0199', '1-800-555-0142', '+44 20 7946 0958', '020 7946 0958',
          '07700 900123', '+44 7700 900123', '+49 30 901820', '+49 151 12345678', '+4915112345678', '+33 1 23 45 67 89', '01 23 45 67 89', '06.12.34.56.78',
          '+91 98765 43210', '+61 2 9374 4000', '+81 3-1234-5678', '+34 912 345 678', '+39 06 6982 1234', '(212) 736-5000', '123-456-7890', '+1 (650) 253-0000', '030 12345678']
phone_templates = ['Call me at {}.', 'Phone: {}', 'my number is {} if you need it', 'Tel {} (office)', 'you can reach the front desk on {}', 'WhatsApp {}']
for number in phones:
    P('phone', rng.choice(phone_templates).format(number))
for text in ['The release date is 2024-01-15.', 'Meeting on 15/01/2024 at 10:30', 'Invoice INV-2023-0042 is overdue', 'ISBN 978-3-16-148410-0',
             'ISBN 0-306-40615-2 is the classic example', 'Population: 1 234 567 people', 'Run 12 345 iterations', 'order #2024-7781 shipped',
             'Version 10.0.19045.3803 is installed', 'The coordinates are 48.8584, 2.2945', 'Call function f(3.14, 2.71)', 'Timestamp 1700000000 in seconds',
             'build 20240115.3 passed', 'Room 101, floor 3, building 7', 'Zip code 94103-1234', 'the range 100-200-300 in the plot',
             'Temperature 21.5 degrees, humidity 45%', 'serial SN-4839-2210-77', 'pages 123-145 of volume 12', 'Score 12:3 at half time',
             'bank code 37040044 for the transfer', 'catalogue no. 0042 117 3', 'error code 0x80070005 again', 'the years 1999-2004 were busy']:
    N(text)

# --- cards --------------------------------------------------------------------------------
networks = [('4', 16), ('4', 16), ('51', 16), ('55', 16), ('2221', 16), ('34', 15), ('37', 15), ('6011', 16), ('65', 16), ('3528', 16), ('36', 14), ('62', 16), ('4', 19)]
card_templates = ['card number {} exp 08/27', 'Please charge {} for the renewal', 'My Visa is {}', 'pay with {}', 'CC: {} CVV on the back', 'the card ending in the numbers {} was declined']
well_known = ['4111 1111 1111 1111', '5555 5555 5555 4444', '3782 822463 10005', '6011 1111 1111 1117', '4242424242424242', '5105-1051-0510-5100', '3530111333300000']
for n in well_known:
    P('card', rng.choice(card_templates).format(n))
for prefix, length in networks:
    number = card(prefix, length)
    sizes = {16: [4, 4, 4, 4], 15: [4, 6, 5], 14: [4, 6, 4], 19: [4, 4, 4, 4, 3]}[length]
    P('card', rng.choice(card_templates).format(group(number, sizes, rng.choice([' ', '-', '']))))
for prefix, length in networks[:10]:
    number = bad_luhn(card(prefix, length))
    sizes = {16: [4, 4, 4, 4], 15: [4, 6, 5], 14: [4, 6, 4], 19: [4, 4, 4, 4, 3]}[length]
    N(rng.choice(card_templates).format(group(number, sizes, rng.choice([' ', '-', '']))) + ' (typo)')
for prefix in ['1', '7', '8', '9', '0']:
    N(f'tracking number {card(prefix, 16)} from the courier')
for text in ['0000 0000 0000 0000 is a placeholder', 'ms timestamp 1718100000000 logged', 'the IMEI 490154203237518 of the phone',
             'account 12345678901234 at the bank', '4111 1111 1111 1111 1111 1111 is too long']:
    N(text)

# --- SSN ----------------------------------------------------------------------------------
ssn_templates = ['SSN: {}', 'social security number {} on the W-2', 'my SSN is {}', 'employee {} (SSN) needs an update']
for _ in range(15):
    area = rng.choice([a for a in range(1, 900) if a != 666])
    P('ssn', rng.choice(ssn_templates).format(f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"))
for text in ['SSN: 000-12-3456 is invalid', 'number 666-45-6789 is never issued', 'ITIN 912-70-1234 is not an SSN', '123-00-4567 has a zero group',
             '123-45-0000 has a zero serial', 'date 2023-05-12 again', 'part no. 123-4567-89', 'phone ext 555-12', 'the 401-k plan, 2024 limits']:
    N(text)

# --- IBAN ---------------------------------------------------------------------------------
bbans = [('DE', '370400440532013000'), ('GB', 'NWBK60161331926819'), ('FR', '20041010050500013M02606'), ('NL', 'ABNA0417164300'), ('ES', '21000418450200051332'),
         ('IT', 'X0542811101000000123456'), ('CH', '00762011623852957'), ('BE', '539007547034'), ('AT', '1904300234573201'), ('PL', '109010140000071219812874'),
         ('SE', '50000000058398257466'), ('NO', '86011117947'), ('IE', 'AIBK93115212345678'), ('PT', '000201231234567890154'), ('DK', '50400440116243')]
iban_templates = ['IBAN: {}', 'please wire it to {} by Monday', 'account {} (IBAN)', 'Bank details: {}, BIC DEUTDEFF']
for country, bban in bbans:
    value = iban(country, bban)
    P('iban', rng.choice(iban_templates).format(spaced(value) if rng.random() < 0.6 else value))
for country, bban in bbans[:8]:
    value = iban(country, bban)
    wrong = value[:2] + f"{(int(value[2:4]) + 1) % 100:02d}" + value[4:]
    N(rng.choice(iban_templates).format(spaced(wrong)) + ' (wrong checksum)')
for text in ['model number AB12 CDEF 3456 GHIJ', 'ticket DE12 is open', 'vehicle plate GB12 ABC', 'product code XX00 1111 2222 3333']:
    N(text)

# --- IP -----------------------------------------------------------------------------------
ip_templates = ['the server at {} is down', 'ssh admin@{}', 'allow {} in the firewall', 'client IP {} made 40 requests', 'DNS points to {}', 'http://{}:8080/health']
for value in ['192.168.1.10', '10.0.0.254', '172.16.254.1', '8.8.8.8', '203.0.113.45', '198.51.100.7', '127.0.0.1', '100.64.12.9', '52.95.110.1', '185.199.108.153']:
    P('ip', rng.choice(ip_templates).format(value))
for value in ['2001:db8::8a2e:370:7334', 'fe80::1ff:fe23:4567:890a', '2001:0db8:85a3:0000:0000:8a2e:0370:7334', '2606:4700:4700::1111', '::ffff:192.0.2.128', '2a00:1450:4001:81c::200e']:
    P('ip', 'IPv6 ' + rng.choice(ip_templates).format(value).replace('http://', 'host '))
for text in ['version 1.2.3.4 was released', 'upgrade to v10.0.0.1 first', 'Chrome/120.0.6099.109 user agent', 'Mozilla/5.0 (X11; Linux x86_64)',
             'OID 1.3.6.1.4.1.311 in the certificate', 'semver 2.10.4 and 3.0.0-rc.1', 'the value 256.1.1.1 is out of range', 'sections 1.2.3 and 4.5.6',
             'MAC 00:1A:2B:3C:4D:5E on eth0', 'time 12:30:45 UTC', 'Rust path std::io::Result', 'C++ scope a::b::c', 'ratio 16:9:4:3 chart',
             'the dotted decimal 1.2.3.4.5 is not an address', 'firmware release 4.2.0.17 notes', 'ipv4 address 999.10.10.10 is invalid']:
    N(text)

# --- clean prose --------------------------------------------------------------------------
for text in ['Summarise the attached meeting notes in three bullet points.', 'What is the capital of Australia?',
             'Write a haiku about autumn leaves.', 'Explain the difference between TCP and UDP.', 'Refactor this function to be iterative.',
             'The quarterly revenue grew 12% to 4.5 million.', 'uuid 123e4567-e89b-12d3-a456-426614174000 in the log',
             'sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08', 'commit 3f2a9c1 fixed the bug', 'md5 d41d8cd98f00b204e9800998ecf8427e']:
    N(text)

# --- secrets ------------------------------------------------------------------------------
sec = []
S = lambda kind, text: sec.append((kind, text))
M = lambda text: sec.append(('-', text))
ctx = ['export OPENAI_API_KEY={}', 'api_key = "{}"', 'Authorization: Bearer {}', 'my key is {} please debug', '{{"key": "{}"}}', 'token={}&user=3']
for _ in range(5):
    S('openai', rng.choice(ctx).format('sk-' + rand(ALNUM, 48)))
for _ in range(5):
    S('openai', rng.choice(ctx).format('sk-proj-' + rand(ALNUM + '-_', 100) + 'T3BlbkFJ' + rand(ALNUM + '-_', 40)))
S('openai', rng.choice(ctx).format('sk-svcacct-' + rand(ALNUM + '-_', 60)))
for _ in range(6):
    S('anthropic', rng.choice(ctx).format('sk-ant-api03-' + rand(ALNUM + '-_', 93) + 'AA'))
for _ in range(6):
    S('aws_access_key', rng.choice(['aws_access_key_id = {}', 'AWS key {} in the config', '"AccessKeyId": "{}"']).format(rng.choice(['AKIA', 'ASIA']) + rand(B32, 16)))
for _ in range(4):
    S('aws_secret_key', rng.choice(['aws_secret_access_key = {}', 'AWS_SECRET_ACCESS_KEY="{}"', 'secret_access_key: {}']).format(rand(ALNUM + '/+', 40)))
for prefix in ['ghp_', 'gho_', 'ghs_', 'ghu_', 'ghp_']:
    S('github', rng.choice(ctx).format(prefix + rand(ALNUM, 36)))
S('github', 'GITHUB_TOKEN=github_pat_' + rand(ALNUM, 22) + '_' + rand(ALNUM, 59))
for prefix in ['xoxb-', 'xoxp-', 'xoxa-']:
    S('slack', rng.choice(ctx).format(prefix + rand(string.digits, 11) + '-' + rand(string.digits, 12) + '-' + rand(ALNUM, 24)))
S('slack', 'webhook https://hooks.slack.com/services/T' + rand(string.ascii_uppercase + string.digits, 8) + '/B' + rand(string.ascii_uppercase + string.digits, 10) + '/' + rand(ALNUM, 24))
for prefix in ['sk_live_', 'sk_test_', 'rk_live_', 'sk_live_']:
    S('stripe', rng.choice(ctx).format(prefix + rand(ALNUM, rng.choice([24, 32, 99]))))
S('stripe', 'STRIPE_WEBHOOK_SECRET=whsec_' + rand(ALNUM, 32))
for kind in ['RSA PRIVATE KEY', 'PRIVATE KEY', 'EC PRIVATE KEY', 'OPENSSH PRIVATE KEY', 'ENCRYPTED PRIVATE KEY', 'PGP PRIVATE KEY BLOCK', 'DSA PRIVATE KEY']:
    body = '\\n'.join(rand(ALNUM + '+/', 64) for _ in range(rng.randint(3, 8)))
    S('private_key', f'here is the key:\\n-----BEGIN {kind}-----\\n{body}\\n-----END {kind}-----\\nuse it carefully')
for alg, claims in [('HS256', {'sub': '1234567890', 'name': 'John Doe', 'iat': 1516239022}), ('RS256', {'iss': 'https://auth.example.com', 'aud': 'api', 'exp': 1900000000}),
                    ('ES256', {'user_id': 42, 'role': 'admin'}), ('HS512', {'sid': 'abc', 'scope': 'read write'}), ('RS256', {'email': 'x@example.com'}), ('none', {'sub': 'anon'})]:
    header = b64url({'alg': alg, 'typ': 'JWT'})
    sig = '' if alg == 'none' else rand(ALNUM + '-_', 43 if alg.startswith('HS') else 86)
    S('jwt', rng.choice(['Authorization: Bearer {}', 'cookie session={}', 'the token {} expired', 'id_token: {}']).format(f"{header}.{b64url(claims)}.{sig}"))
for text in ['pip install scikit-learn, often written sk-learn-style-transformers-and-pipelines', 'set OPENAI_API_KEY=sk-... before running',
             'replace sk-XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX with your key', 'export OPENAI_API_KEY="${OPENAI_API_KEY}"', 'the key starts with sk-ant- and is secret',
             'sk-proj-your-project-key-goes-here-in-lowercase-words', 'AKIA is the prefix of long-term AWS access key ids', 'AKIAEXAMPLE is too short',
             'aws_secret_access_key = <your secret here>', '-----BEGIN PUBLIC KEY-----\\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\\n-----END PUBLIC KEY-----',
             '-----BEGIN CERTIFICATE-----\\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\\n-----END CERTIFICATE-----', 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@host',
             'the publishable key pk_live_51HcW2xKZb3LoKJtSGd8F2a is safe to embed', 'pk_test_TYooMQauvdEDq54NiTphI7jx is the docs example',
             'ghp_ tokens are classic PATs; gho_ are OAuth tokens', 'xoxb-your-bot-token-here', 'sk_test_short', 'whsec_ prefix marks webhook secrets',
             'commit 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b', 'sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
             'uuid 550e8400-e29b-41d4-a716-446655440000', 'integrity sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==',
             'base64 aGVsbG8gd29ybGQsIHRoaXMgaXMgbm90IGEgc2VjcmV0 decodes to a greeting', 'eyJ is the base64 of {" and that is all', 'the JWT format is header.payload.signature',
             'eyJmb28iOiJiYXIifQ.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl has no alg', 'password: hunter2 (just kidding)', 'API_KEY=changeme', 'Bearer token goes in the header',
             'The AWS region is us-east-1 and the bucket is my-data-bucket', 'arn:aws:iam::123456789012:role/Admin', 'AIDAJQABLZS4A3QDU576Q is an IAM user id, not a key',
             'The variable name secret_access_key_rotation_days = 90', 'slack channel #sk-ant-discussions', 'token_type=bearer&expires_in=3600']:
    M(text)

def write(name, rows, header):
    with open(name, 'w') as f:
        f.write(header)
        for label, text in rows:
            assert '\t' not in text and '\n' not in text, text
            f.write(f"{label}\t{text}\n")

HEADER = "# LABEL<TAB>TEXT: LABEL is the kind the text must yield, '-' for none. '\\n' is a line break.\n# Generated by generate.py (fixed seed): edit that, not this file.\n"
write('pii.txt', pii, HEADER)
write('secrets.txt', sec, HEADER)
print(len(pii), len(sec))
