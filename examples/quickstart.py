import torch
from torch import nn

from locoprop import LocoPropOptimizer

torch.manual_seed(0)
# A small autoencoder; the sigmoid output is folded into the loss.
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 64))
data = torch.sigmoid(torch.randn(2048, 8) @ torch.randn(8, 64))  # structured data in [0, 1]
loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True)


def loss_fn(logits, x):  # BCE summed over pixels, averaged over the batch
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1).mean()


opt = LocoPropOptimizer(
    model,
    variant="M",
    lr=1e-3,
    activation_lr=1.0,
    local_iters=10,
    inner="rmsprop-tf",
    inner_kwargs={"momentum": 0.9, "eps": 1e-5},
    output_activation="sigmoid",
)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
for epoch in range(20):
    for x in loader:
        opt.zero_grad()
        loss = loss_fn(model(x), x)
        loss.backward()
        opt.step()
    scheduler.step()
    if epoch % 5 == 4:
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}")
print("units:", [(u.name, u.transfer.name) for u in opt.units])
